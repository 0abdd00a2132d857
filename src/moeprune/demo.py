"""`moeprune demo`: the whole spine on the embedded default model, offline.

testbed (build or reuse the trained multi-domain Qwen3-MoE) -> calibrate on its calibration text (once) ->
plan at 25 % and 50 % with the default method -> apply + save -> verify (stock reload == masked original) ->
evaluate every model on the testbed's held-out domains -> terminal tables and WORKDIR/report.{md,json,png}.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from moeprune import api
from moeprune.calibration.data import CalibConfig
from moeprune.calibration.run import CalibrateOptions
from moeprune.criteria import CRITERIA
from moeprune.errors import MoePruneError
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import markdown_table, plot_ratios, ratio_table
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.log import logger
from moeprune.models.summary import format_summary
from moeprune.select.auto import AUTO, describe_choice
from moeprune.testbed import build_testbed

# chosen per model at run time: auto beat every single criterion on the testbed and on a held-out model
# (benchmarks/RESULTS.md, "Choosing the method per model")
DEFAULT_METHOD = AUTO
RATIOS = (0.25, 0.5)


def run_demo(workdir: str | Path, method: str | None = None, testbed: str | Path | None = None,
             calib_samples: int = 64, eval_sequences: int = 64) -> int:
    method = method or DEFAULT_METHOD
    crit = None if method == AUTO else CRITERIA.get(method)  # unknown names fail before any work
    work = Path(workdir).expanduser().resolve()
    if not work.parent.is_dir():
        raise MoePruneError(f"the parent folder of --workdir {work} does not exist; create it first.")
    work.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    tb = build_testbed(testbed)
    original = tb.path
    for folder in ["report", *(f"{method}-{int(ratio * 100)}" for ratio in RATIOS)]:  # replaced only if ours
        check_output(work / folder, [original], overwrite=True)
    print(format_summary(api.info(original)))
    opts = DemoCalibrateOptions(tb.specs("calib"), samples=calib_samples, seq_len=tb.seq_len, held_out=0)
    rows, choices = [], {}
    if crit is None:  # auto calibrates and judges per ratio inside `prune` (exported and verified there)
        for ratio in RATIOS:
            applied, result = api.prune(original, work / f"{method}-{int(ratio * 100)}", method=method,
                                        ratio=ratio, calib=opts, overwrite=True)
            rows.append((ratio, applied, result))
            choices[f"{ratio:.0%}"] = describe_choice(applied.report["auto"])
            print(choices[f"{ratio:.0%}"])
    else:
        stats = None
        if crit.needs == "calibration":
            stats = api.calibrate(original, opts, out=work / "stats.safetensors", overwrite=True)
        for ratio in RATIOS:
            plan = api.make_plan(stats if stats is not None else original, method, ratio)
            applied = api.apply_plan(original, plan, work / f"{method}-{int(ratio * 100)}", overwrite=True)
            rows.append((ratio, applied, api.verify(original, applied.out, plan)))
    eval_opts = EvalOptions(max_sequences=eval_sequences).for_model(original)  # the testbed's held-out domains
    base = api.evaluate(original, eval_opts).scores
    variants = {f"{method} {ratio:.0%}": api.evaluate(applied.out, eval_opts).scores for ratio, applied, _ in rows}
    sizes = _size_table(rows)
    quality = markdown_table(base, variants)
    windows = _windows_note(eval_opts)
    print("\n" + sizes + f"\nheld-out perplexity ratio (pruned / original, lower is better),\n{windows}:\n" + quality)
    report = {"method": method, "testbed": str(original), "seconds": round(time.perf_counter() - t0, 1),
              **({"auto": choices} if choices else {}),
              "eval": {"max_sequences": eval_opts.max_sequences, "seq_len": eval_opts.seq_len, "note": windows},
              "original": {d: s.to_dict() for d, s in base.items()},
              "variants": {label: {"scores": {d: s.to_dict() for d, s in v.items()},
                                   "ratios": ratio_table(base, {label: v})[label]} for label, v in variants.items()},
              "exports": [{"ratio": ratio, "folder": str(a.out), "verify": r.to_dict(),
                           "weight_bytes_before": a.report["weight_bytes_before"],
                           "weight_bytes_after": a.report["weight_bytes_after"]} for ratio, a, r in rows]}
    out = work / "report"
    with atomic_dir(out) as tmp:
        chosen = "".join(f"- {ratio}: {line}\n" for ratio, line in choices.items())
        (tmp / "report.md").write_text(f"# moeprune demo — {method} on the testbed\n\n"
                                       + (f"{chosen}\n" if chosen else "") + f"{sizes}\n## Held-out "
                                       f"perplexity ratio (pruned / original)\n\nMeasured {windows}.\n\n{quality}\n"
                                       "![ratios](report.png)\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_ratios(base, variants, tmp / "report.png", f"{method}: held-out perplexity ratio per domain")
    print(f"report: {out / 'report.md'} (+ report.json, report.png); pruned checkpoints load with "
          f"AutoModelForCausalLM.from_pretrained. {time.perf_counter() - t0:.0f} s in all.")
    logger.info("demo finished")
    return 0 if all(r.passed for _, _, r in rows) else 1


@dataclass(frozen=True)
class DemoCalibrateOptions(CalibrateOptions):
    """Calibration options the demo chooses itself: a testbed domain with fewer windows than the demo's sample count
    is expected there, not a `--samples` the user gave, so it is not warned about."""

    def calib_config(self) -> CalibConfig:
        return replace(super().calib_config(), warn_short=False)


def _windows_note(opts: EvalOptions) -> str:
    """Which held-out windows the quality table uses (the demo scores fewer than `moeprune eval` does)."""
    return (f"on up to {opts.max_sequences} held-out windows of {opts.seq_len} tokens per domain (a seeded draw; "
            f"`moeprune eval` scores up to {EvalOptions.max_sequences}, so its perplexities differ)")


def _size_table(rows) -> str:
    lines = ["| ratio | experts/layer | weight bytes | size | max abs Δlogit | verify | folder |",
             "|---:|---|---:|---:|---:|---|---|"]
    for ratio, applied, result in rows:
        r = applied.report
        lines.append(f"| {ratio:.0%} | {r['num_experts_before']} → {r['num_experts_after']} | "
                     f"{r['weight_bytes_after']:,} | {r['weight_bytes_after'] / r['weight_bytes_before']:.1%} | "
                     f"{result.max_abs_diff:.2e} | {'PASS' if result.passed else 'FAIL'} | {applied.out.name} |")
    return "\n".join(lines) + "\n"

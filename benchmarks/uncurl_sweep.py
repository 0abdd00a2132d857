"""UNCURL knees per domain on the testbed (issue 21): `moeprune sweep`'s engine over the 4 domains.

    python benchmarks/uncurl_sweep.py [--testbed DIR] [--calib-samples 32] [--eval-sequences 32]
                                      [--criteria tcess,tcess_top1,easy_ep] [--out benchmarks/results/uncurl_sweep]

Per criterion, ONE calibration pass over the 4 domains' calibration text (`calib_samples` windows each) with the
block-error probe (`moeprune.sweep.run.sweep_sets`, 1 024 probe tokens per domain and layer), then per domain d and
ratio r = 0.1..0.9 (step 0.1): d's own plan (criterion on d's statistics only, uniform per layer), its block
reconstruction error per MoE layer on d's calibration tokens, and d's held-out perplexity ratio
(`eval_sequences` windows of the testbed's disjoint held-out file) with that plan's experts masked:

    quality(d, r) = ppl(d's plan at r, d's held-out) / ppl(original, d's held-out)
    knee(d)       = first crossing of ×1.05 (interpolated), recommend(d) = knee rounded down to a swept ratio
    cliff(d, ℓ)   = first r with block error > 0.1

Writes OUT.json (every number), OUT.md (tables), OUT.png (the first criterion's curves and heat maps) and
OUT-<criterion>.png for the others, OUT-ratios.json ({domain: ratio} of the first criterion); prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from heldout import HeldOut, results_path, save_results

from moeprune.calibration.data import build_sets
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.sweep.options import SweepOptions
from moeprune.sweep.report import fmt, plot, tables
from moeprune.sweep.run import sweep_sets

RATIOS = tuple(round(0.1 * i, 10) for i in range(1, 10))


def summary(runs: dict[str, dict]) -> str:
    """Knee / recommendation / elbow and cliffs per domain, one row per criterion and domain."""
    first = next(iter(runs.values()))
    layers = first["layers"]
    lines = ["| criterion | domain | ppl original | knee (×1.05) | recommend | elbow | quality at recommend | "
             + " | ".join(f"cliff L{x}" for x in layers) + " |", "|" + "---|" * (6 + len(layers) + 1)]
    for crit, d in runs.items():
        for name, t in d["tasks"].items():
            rec = t["recommend"]
            q = t["quality"][d["ratios"].index(rec)] if rec is not None else None
            knee = "holds" if t["holds"] else f"{t['knee']:.3f}"
            lines.append(f"| {crit} | {name} | {t['perplexity_original']:.3f} | {knee} | {fmt(rec, 'g')} | "
                         f"{fmt(t['elbow'], 'g')} | {fmt(q, '.3f')} | "
                         + " | ".join(fmt(c, "g") for c in t["cliff"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/uncurl_sweep")
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--criteria", default="tcess,tcess_top1,easy_ep")
    args = ap.parse_args()
    out = results_path(args.out)
    torch.set_num_threads(1)
    start = time.perf_counter()
    ho = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    sets = build_sets(ho.calib.calib_config(), ho.tokenizer)
    held = {h.name: h for h in ho.held}
    held = [held[s.name] for s in sets]  # the held-out file of each calibration domain, in the same order
    runs, timings = {}, {}
    for crit in args.criteria.split(","):
        t0 = time.perf_counter()
        model = load_model(ho.tb.path, dtype="float32")
        adapter = get_adapter(model.config, model=model)
        runs[crit] = sweep_sets(model, adapter, sets, held, SweepOptions(RATIOS, criterion=crit), ho.calib,
                                meta={"model": str(ho.tb.path)})
        timings[crit] = round(time.perf_counter() - t0, 1)
        for name, t in runs[crit]["tasks"].items():  # the sweep's original equals the shared evaluation
            assert abs(t["perplexity_original"] / ho.base[name].perplexity - 1) < 1e-9, name
        plot(runs[crit], out.with_name(out.name + ("" if len(runs) == 1 else f"-{crit}")).with_suffix(".png"))
    first = next(iter(runs))
    out.with_name(out.name + "-ratios").with_suffix(".json").write_text(
        json.dumps(runs[first]["recommended"], indent=1) + "\n")
    md = [f"# UNCURL sweep on the testbed ({args.calib_samples} calibration windows and {args.eval_sequences} "
          f"held-out windows of {ho.tb.seq_len} tokens per domain; ratios 0.1..0.9)", "",
          "## Knees, recommendations and cliffs", "", summary(runs)]
    for crit, d in runs.items():
        md += [f"## {crit}", "", tables(d)]
    md.append(f"Wall time: {time.perf_counter() - start:.0f} s on one thread (per criterion: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ").")
    save_results(out, {"calib_samples": args.calib_samples, "eval_sequences": args.eval_sequences,
                       "wall_s": round(time.perf_counter() - start, 1), "per_criterion_s": timings, "runs": runs},
                 "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

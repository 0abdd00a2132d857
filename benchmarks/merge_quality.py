"""Expert merging vs expert pruning on the testbed: per-domain perplexity ratio and greedy-generation checks.

    python benchmarks/merge_quality.py [--testbed DIR] [--ratios 0.25 0.5] [--out benchmarks/results/merge_quality]

One calibration pass over the four calibration domains (with every-expert probes for the output-based groupings);
mixed statistics for every plan. Rows per ratio:
- pruning references: tcess_top1 (the default criterion) and frequency, through the same expert-removal surgery;
- merges: msmoe, hcsmoe, submoe, dern, each with the dominant's router row and with the usage-weighted row;
  ablations: msmoe without neuron alignment, msmoe with the global (adaptive) budget, submoe at half rank,
  dern at thresholds 0.0 / 0.2 / 0.4.
Each plan is applied to an in-memory copy (the surgery `apply` saves and `verify` checks) and scored on the same
held-out windows:

    ratio(domain) = perplexity(model, domain) / perplexity(original, domain),  geo-mean over the 4 domains;
    generation: the first `--prompt-tokens` tokens of `--gen-prompts` held-out windows per domain, 32 greedy tokens;
      agree = fraction of positions equal to the original model's greedy continuation, prefix = mean common
      prefix / 32, distinct-3 = distinct 3-grams / all (repetition loops drive it down; the original's is shown).

Writes OUT.json (every row, with one decoded sample per domain and model) and OUT.md, prints the markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from functools import partial
from pathlib import Path

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.eval.generate import agreement, distinct_ngrams, greedy_continuations
from moeprune.eval.perplexity import evaluate_sets
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import ratio_table
from moeprune.io.load import load_model
from moeprune.merge.average import merge_average
from moeprune.merge.build import make_merge_plan
from moeprune.models import get_adapter
from moeprune.surgery.in_memory import apply_plan
from moeprune.surgery.merge import apply_merge_plan
from moeprune.testbed import build_testbed

MERGES = ("msmoe", "hcsmoe", "submoe", "dern")
PRUNES = ("tcess_top1", "frequency")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--probe-stride", type=int, default=32,
                    help="probe tokens 1 in N (the results were measured with 32 = ⌈4E/k⌉; the default of "
                         "`calibrate` is ⌈8E/k⌉ = 64 on the testbed)")
    ap.add_argument("--gen-prompts", type=int, default=16, help="generation prompts per domain")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/merge_quality", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        sys.exit(f"--out {out}: folder {out.parent} does not exist")
    t0 = time.perf_counter()
    tb = build_testbed(args.testbed)
    domains = list(tb.data("calib"))
    stats = api.calibrate(tb.path, CalibrateOptions(tb.specs("calib"), samples=args.calib_samples,
                                                    seq_len=tb.seq_len, probe_stride=args.probe_stride))
    calib_seconds = time.perf_counter() - t0
    tok = load_tokenizer(tb.path, None)
    held = build_sets(EvalOptions(max_sequences=args.eval_sequences).for_model(tb.path).data_config(), tok)
    prompts = {s.name: s.input_ids[: args.gen_prompts, : args.prompt_tokens] for s in held}  # [n, P] no padding
    original = load_model(tb.path, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    base = evaluate_sets(original, held)
    gen_base = {d: greedy_continuations(original, p, args.new_tokens) for d, p in prompts.items()}
    rows = []

    def add(label: str, kind: str, ratio: float, model, plan_seconds: float, extra: dict | None = None) -> None:
        scores = evaluate_sets(model, held)
        r = ratio_table(base, {"x": scores})["x"]
        gen = {d: greedy_continuations(model, p, args.new_tokens) for d, p in prompts.items()}
        agree = {d: agreement(gen_base[d], gen[d]) for d in domains}
        row = {"label": label, "kind": kind, "ratio": ratio, "geo_mean": r["mean"],
               "ratios": {d: r[d] for d in domains}, "perplexity": {d: s.perplexity for d, s in scores.items()},
               "agree": {d: a[0] for d, a in agree.items()}, "prefix": {d: a[1] for d, a in agree.items()},
               "distinct3": {d: distinct_ngrams(gen[d]) for d in domains},
               "sample": {d: tok.decode(gen[d][0]) for d in domains}, "plan_seconds": round(plan_seconds, 2),
               **(extra or {})}
        rows.append(row)
        print(f"  {label:<28} {ratio:4.0%} ppl ×{r['mean']:.3f} agree {_mean(row['agree']):.3f} "
              f"distinct3 {_mean(row['distinct3']):.3f}  " + " ".join(f"{d} ×{r[d]:.2f}" for d in domains),
              flush=True)

    add("original", "original", 0.0, original, 0.0)
    for ratio in args.ratios:
        for method in PRUNES:
            t = time.perf_counter()
            plan = api.make_plan(stats, method, ratio)
            model = copy.deepcopy(original)
            apply_plan(model, adapter, plan)
            add(f"prune {method}", "prune", ratio, model, time.perf_counter() - t)
        variants = [(m, dict(router=router), None) for m in MERGES for router in ("dominant", "weighted")]
        variants += [("msmoe", dict(budget="global"), None),
                     ("msmoe", {}, partial(merge_average, align=False)),
                     ("submoe", dict(rank=adapter.expert_width // 2), None),
                     ("dern", dict(threshold=0.2), None), ("dern", dict(threshold=0.0), None)]
        for method, kw, merge_fn in variants:
            t = time.perf_counter()
            plan = make_merge_plan(stats, method, ratio, **kw)
            model = copy.deepcopy(original)
            apply_merge_plan(model, adapter, plan, merge_fn)
            kept = len(plan.groups[plan.layers[0]])
            label = f"merge {method}" + "".join(f" {k}={v}" for k, v in kw.items()) + (" no-align" if merge_fn
                                                                                          else "")
            if kw.get("budget") == "global":
                label += f" (keeps {kept}/{plan.num_experts})"
            add(label, "merge", ratio, model, time.perf_counter() - t,
                {"method": method, "options": kw, "align": merge_fn is None, "note": plan.note, "kept": kept,
                 "dern_recombined": dern_share(original, adapter, plan) if plan.merge == "dern" else None})
    result = {"testbed": str(tb.path), "testbed_config": tb.meta["config"], "domains": domains,
              "calib_samples": args.calib_samples, "eval_sequences": args.eval_sequences,
              "gen": {"prompts": args.gen_prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens},
              "probe_stride": stats.meta["probe_stride"], "probe_tokens": int(stats.combined()[stats.layers[0]]
                                                                             .sums["probe_tokens"].item()),
              "calibration_seconds": round(calib_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
              "prompt_text": {d: tok.decode(p[0]) for d, p in prompts.items()}, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = to_markdown(result, args.ratios)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def dern_share(model, adapter, plan) -> float:
    """Fraction of the dropped experts' neuron segments that DERN recombined (cosine >= threshold)."""
    from moeprune.merge.dern import dern_assign
    from moeprune.surgery.merge import expert_of

    moved = total = 0
    for layer in plan.layers:
        roles = adapter.expert_roles(adapter.block(model, layer))
        experts = [expert_of(roles, j) for j in range(plan.num_experts)]
        dropped = [j for g in plan.groups[layer] for j in g[1:]]
        assign = dern_assign(experts, [g[0] for g in plan.groups[layer]], dropped, plan.threshold)
        moved += sum(k.numel() for k, _, _ in assign.values())
        total += len(dropped) * experts[0]["gate"].shape[0]
    return moved / max(total, 1)


def _mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def to_markdown(result: dict, ratios: list[float]) -> str:
    domains, rows = result["domains"], result["rows"]
    orig = next(r for r in rows if r["kind"] == "original")
    lines = [f"Testbed `{Path(result['testbed']).name}`: {result['calib_samples']} calibration and "
             f"{result['eval_sequences']} held-out windows per domain; probes every {result['probe_stride']} "
             f"tokens ({result['probe_tokens']} probe tokens per layer); calibration {result['calibration_seconds']}"
             f" s, whole run {result['seconds']:.0f} s. Generation: {result['gen']['prompts']} prompts of "
             f"{result['gen']['prompt_tokens']} tokens per domain, {result['gen']['new_tokens']} greedy tokens; "
             f"the original's distinct-3 is {_mean(orig['distinct3']):.3f}.", ""]
    for ratio in ratios:
        sel = sorted((r for r in rows if r["ratio"] == ratio), key=lambda r: r["geo_mean"])
        lines += [f"### {ratio:.0%} fewer experts (perplexity ratio, lower is better; agree/prefix/distinct-3: "
                  "greedy generation, mean over domains)", "",
                  "| rank | model | " + " | ".join(domains) + " | geo-mean | agree | prefix | distinct-3 |",
                  "|---:|---|" + "---:|" * (len(domains) + 4)]
        for i, r in enumerate(sel, 1):
            lines.append(f"| {i} | {r['label']} | " + " | ".join(f"{r['ratios'][d]:.3f}" for d in domains)
                         + f" | **{r['geo_mean']:.3f}** | {_mean(r['agree']):.3f} | {_mean(r['prefix']):.3f} | "
                         f"{_mean(r['distinct3']):.3f} |")
        lines.append("")
        best = {d: min(sel, key=lambda r, d=d: r["ratios"][d]) for d in domains}
        lines.append("Best per domain: " + ", ".join(f"{d}: {best[d]['label']} ×{best[d]['ratios'][d]:.3f}"
                                                    for d in domains))
        lines.append("")
    dern = [r for r in rows if r.get("dern_recombined") is not None]
    if dern:
        lines += ["DERN: share of the dropped experts' neuron segments recombined into survivors: "
                  + ", ".join(f"{r['ratio']:.0%} {r['label'].removeprefix('merge dern').strip() or 'default'} "
                              f"{r['dern_recombined']:.1%}" for r in dern), ""]
    lines += ["### Greedy samples (first prompt per domain)", ""]
    for d in domains:
        lines += [f"**{d}** — prompt: `{_clip(result['prompt_text'][d])}`", ""]
        for r in [orig] + [r for r in rows if r["ratio"] == max(ratios) and (r["kind"] == "prune" or (
                r["kind"] == "merge" and r.get("options") in ({"router": "dominant"},)))]:
            at = "" if r is orig else f" ({r['ratio']:.0%})"
            lines.append(f"- {r['label']}{at}: `{_clip(r['sample'][d])}`")
        lines.append("")
    return "\n".join(lines)


def _clip(text: str, n: int = 160) -> str:
    text = text.replace("\n", "⏎").replace("`", "'")
    return text if len(text) <= n else text[:n] + "…"


if __name__ == "__main__":
    raise SystemExit(main())

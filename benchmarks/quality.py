"""Quality of every expert-level method on the testbed: per-domain held-out perplexity ratio vs the original.

    python benchmarks/quality.py [--testbed DIR] [--ratios 0.25 0.5] [--out benchmarks/results/quality]

Grid: every criterion × ratio × calibration {mixed (all four domains), each single domain}; data-free criteria
once per ratio; `random` over three seeds (mean); plus prune-as-you-go (REAP) and NAEE reconstruction with mixed
calibration (fewer windows: NAEE's search is the slow part). One calibration pass over the four domains gives
every per-domain statistic (`mixed` = their sum). Each plan is applied to an in-memory copy of the testbed (the
same surgery that `apply` saves and `verify` checks) and scored on the same held-out windows:

    ratio(domain) = perplexity(pruned, domain) / perplexity(original, domain),  geo-mean over the 4 domains.

Writes OUT.json (every row) and OUT.md (tables), prints the markdown.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.criteria import CRITERIA
from moeprune.eval.perplexity import evaluate_sets
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import ratio_table
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.surgery.in_memory import apply_plan
from moeprune.testbed import build_testbed

RANDOM_SEEDS = (0, 1, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", help="criteria (default: all registered)")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--no-progressive", action="store_true", help="skip prune-as-you-go and NAEE rows")
    ap.add_argument("--progressive-samples", type=int, default=8,
                    help="calibration windows per domain for as-you-go / NAEE (NAEE's exhaustive search evaluates "
                         "C(16, 4) = 1820 subsets per layer at 25%%, each a block forward over these windows)")
    ap.add_argument("--out", default="benchmarks/results/quality", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        sys.exit(f"--out {out}: folder {out.parent} does not exist")
    methods = args.methods or list(CRITERIA)
    for m in methods:
        CRITERIA.get(m)
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tb = build_testbed(args.testbed)
    domains = list(tb.data("calib"))
    calib = CalibrateOptions(tb.specs("calib"), samples=args.calib_samples, seq_len=tb.seq_len)
    stats = api.calibrate(tb.path, calib)
    eval_opts = EvalOptions(max_sequences=args.eval_sequences).for_model(tb.path)
    held = build_sets(eval_opts.data_config(), load_tokenizer(tb.path, None))
    original = load_model(tb.path, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    base = evaluate_sets(original, held)

    def score(plan) -> dict:
        model = copy.deepcopy(original)
        apply_plan(model, adapter, plan)
        return evaluate_sets(model, held)

    rows = []

    def add(method: str, ratio: float, calib_name: str, scores: dict, kept: dict | None = None) -> None:
        r = ratio_table(base, {"x": scores})["x"]
        rows.append({"method": method, "ratio": ratio, "calib": calib_name,
                     "perplexity": {d: s.perplexity for d, s in scores.items()},
                     "ratios": {d: r[d] for d in base}, "geo_mean": r["mean"],
                     "kept": {str(k): v for k, v in (kept or {}).items()}})
        print(f"  {method:<15} {ratio:4.0%} calib={calib_name:<10} geo-mean ×{r['mean']:.3f}  "
              + " ".join(f"{d} ×{r[d]:.2f}" for d in base), flush=True)

    for ratio in args.ratios:
        for method in methods:
            crit = CRITERIA.get(method)
            if method == "random":
                for seed in RANDOM_SEEDS:
                    plan = api.make_plan(tb.path, "random", ratio, seed=seed)
                    add("random", ratio, f"seed{seed}", score(plan), plan.kept_experts)
            elif crit.needs != "calibration":
                plan = api.make_plan(tb.path, method, ratio)
                add(method, ratio, "none", score(plan), plan.kept_experts)
            else:
                for name in ["mixed", *domains]:
                    plan = api.make_plan(stats, method, ratio, calib_set=None if name == "mixed" else [name])
                    add(method, ratio, name, score(plan), plan.kept_experts)
        if not args.no_progressive:
            small = dataclasses.replace(calib, samples=args.progressive_samples)
            with tempfile.TemporaryDirectory() as tmp:
                for label, kw in (("reap+as-you-go", dict(method="reap", as_you_go=True)),
                                  ("naee", dict(method=None, policy="reconstruction"))):
                    folder = Path(tmp) / f"{label}-{ratio}"
                    applied, _ = api.prune(tb.path, folder, ratio=ratio, calib=small, run_verify=False, **kw)
                    scores = evaluate_sets(load_model(folder, dtype="float32"), held)
                    add(label, ratio, "mixed", scores, applied.report.get("kept_experts"))
    result = {"testbed": str(tb.path), "testbed_config": tb.meta["config"], "domains": domains,
              "original": {d: s.to_dict() for d, s in base.items()}, "calib_samples": args.calib_samples,
              "progressive_samples": args.progressive_samples,
              "eval_sequences": args.eval_sequences, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = to_markdown(result, args.ratios)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def to_markdown(result: dict, ratios: list[float]) -> str:
    domains, rows = result["domains"], result["rows"]
    lines = [f"Testbed `{Path(result['testbed']).name}` ({result['testbed_config']['num_experts']} experts, "
             f"top-{result['testbed_config']['top_k']}); {result['calib_samples']} calibration and "
             f"{result['eval_sequences']} held-out windows of {result['testbed_config']['seq_len']} tokens per "
             f"domain; {result['seconds']:.0f} s.", "",
             f"As-you-go and NAEE rows calibrate on {result['progressive_samples']} windows per domain.", "",
             "Original perplexity: " + ", ".join(f"{d} {result['original'][d]['perplexity']:.3f}" for d in domains),
             ""]
    for ratio in ratios:
        sel = [r for r in rows if r["ratio"] == ratio and r["calib"] in ("mixed", "none")]
        rnd = [r for r in rows if r["ratio"] == ratio and r["method"] == "random"]
        if rnd:
            sel.append({"method": f"random (mean of {len(rnd)})", "calib": "seeds",
                        "ratios": {d: _geo([r["ratios"][d] for r in rnd]) for d in domains},
                        "geo_mean": _geo([r["geo_mean"] for r in rnd])})
        sel.sort(key=lambda r: r["geo_mean"])
        lines += [f"### {ratio:.0%} of experts removed — mixed calibration (perplexity ratio, lower is better)", "",
                  "| rank | method | calib | " + " | ".join(domains) + " | geo-mean |",
                  "|---:|---|---|" + "---:|" * (len(domains) + 1)]
        for i, r in enumerate(sel, 1):
            cells = " | ".join(f"{r['ratios'][d]:.3f}" for d in domains)
            lines.append(f"| {i} | {r['method']} | {r['calib']} | {cells} | **{r['geo_mean']:.3f}** |")
        lines.append("")
    calibrated = sorted({r["method"] for r in rows if r["calib"] in domains})
    for ratio in ratios:
        lines += [f"### Domain-specific calibration at {ratio:.0%}: perplexity ratio on each held-out domain "
                  "(rows: calibration domain; diagonal = calibrated domain)", ""]
        for method in calibrated:
            table = {c: next(r for r in rows if r["method"] == method and r["ratio"] == ratio and r["calib"] == c)
                     for c in ["mixed", *domains]}
            # a domain "wins" when calibrating on it gives it the lowest ratio of all single-domain calibrations
            wins = [d for d in domains if all(table[d]["ratios"][d] <= table[c]["ratios"][d] for c in domains)]
            lines += [f"**{method}**", "", "| calib \\ eval | " + " | ".join(domains) + " |",
                      "|---|" + "---:|" * len(domains)]
            for c, row in table.items():
                lines.append(f"| {c} | " + " | ".join(f"**{row['ratios'][d]:.3f}**" if c == d
                                                      else f"{row['ratios'][d]:.3f}" for d in domains) + " |")
            lines.append(f"\n{len(wins)}/{len(domains)} domains keep their perplexity best when calibrated on "
                         f"themselves ({', '.join(wins) or 'none'}).\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

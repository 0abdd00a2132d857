"""What each repair buys on the testbed: held-out perplexity ratio per domain, greedy agreement and wall time.

    python benchmarks/repair.py [--testbed DIR] [--cuts experts25 experts50 heapr50] [--repairs none compensate ...]
                                [--distill 200 1000] [--out benchmarks/results/repair]

Cuts: 25 % and 50 % of experts removed (`--expert-method`, default tcess_top1, the best single-pass criterion of
benchmarks/RESULTS.md) and 50 % of routed-expert parameters removed by HEAPr with a uniform width (budget expert:
stock-loadable). Each cut is followed by nothing, by one closed-form repair (`{method: repair, kind: K}`), or by
distillation for N steps (`{method: distill, steps: N}`, default options), or by `all` then the shortest
distillation. Every row is one `api.prune`
run of that recipe (calibration included; its wall time is the row's time) and is scored on the testbed's held-out
text, which calibration, repair and distillation never see:

    ratio(domain) = perplexity(export, domain) / perplexity(original, domain),  geo-mean over the domains;
    agree = fraction of greedy-continuation tokens equal to the original's (same prompts from held-out text).
Writes OUT.json and OUT.md; prints the markdown.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from heldout import HeldOut, results_path, save_results

from moeprune import api
from moeprune.eval.generate import agreement, greedy_continuations
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.load import load_model
from moeprune.stages.base import STAGES

CUTS = {"experts25": ("experts", 0.25), "experts50": ("experts", 0.5), "heapr50": ("heapr", 0.5)}
REPAIRS = ("none", "obs", "compensate", "router", "all")


def cut_stage(cut: str, expert_method: str) -> dict:
    kind, ratio = CUTS[cut]
    if kind == "heapr":
        return {"method": "heapr", "ratio": ratio, "budget": "expert"}
    return {"method": expert_method, "ratio": ratio}


def applies(repair: str, cut: str) -> bool:
    """obs repairs neuron removal; router re-fits after expert removal (the stage refuses the other pairs)."""
    neurons = CUTS[cut][0] == "heapr"
    return not ((repair == "obs" and not neurons) or (repair == "router" and neurons))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--cuts", nargs="+", default=list(CUTS), choices=list(CUTS))
    ap.add_argument("--repairs", nargs="+", default=list(REPAIRS), choices=list(REPAIRS))
    ap.add_argument("--distill", type=int, nargs="*", default=[200, 1000], help="distillation steps (rows)")
    ap.add_argument("--expert-method", default="tcess_top1")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--gen-prompts", type=int, default=8, help="generation prompts per domain")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/repair", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    out = results_path(args.out)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    h = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    tb, domains, calib, held = h.tb, h.domains, h.calib, h.held
    prompts = {s.name: s.input_ids[: args.gen_prompts, :48] for s in held}  # [n, 48] no padding
    original = load_model(tb.path, dtype="float32")
    gen_base = {d: greedy_continuations(original, p, args.new_tokens) for d, p in prompts.items()}
    del original
    distill = "distill" in STAGES and args.distill
    rows = []
    for cut in args.cuts:
        variants = [(r, [{"method": "repair", "kind": r}] if r != "none" else []) for r in args.repairs
                    if applies(r, cut)]
        variants += [(f"distill {n}", [{"method": "distill", "steps": n}]) for n in (args.distill if distill else [])]
        if distill and args.distill and "all" in args.repairs:  # both: the closed form first, then training from it
            n = min(args.distill)
            variants.append((f"all + distill {n}", [{"method": "repair", "kind": "all"},
                                                    {"method": "distill", "steps": n}]))
        for label, tail in variants:
            recipe = [cut_stage(cut, args.expert_method), *tail]
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                applied, _ = api.prune(tb.path, Path(tmp) / "out", recipe, calib=calib, run_verify=False)
                seconds = time.perf_counter() - t
                model = load_model(applied.out, dtype="float32")
                scores = evaluate_sets(model, held)
                gen = {d: greedy_continuations(model, p, args.new_tokens) for d, p in prompts.items()}
                repair = next((st for st in applied.report["stages"] if st["stage"] == "repair"), {})
                summary = repair.get("summary", {})
            ratios, geo = h.ratios(scores)
            agree = sum(agreement(gen_base[d], gen[d])[0] for d in domains) / len(domains)
            row = {"cut": cut, "repair": label, "recipe": recipe, "ratios": ratios,
                   "geo_mean": geo, "agree": agree, "seconds": round(seconds, 1),
                   "calibration_block_error_ratio": summary.get("ratio")}
            rows.append(row)
            print(f"  {cut:<10} {label:<12} ppl ×{geo:.3f} agree {agree:.3f} {seconds:6.1f} s  "
                  + " ".join(f"{d} ×{ratios[d]:.3f}" for d in domains), flush=True)
    result = {"testbed": str(tb.path), "domains": domains, "calib_samples": args.calib_samples,
              "eval_sequences": args.eval_sequences, "expert_method": args.expert_method,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
              "command": "python benchmarks/repair.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    save_results(out, result, to_markdown(result))
    return 0


def to_markdown(result: dict) -> str:
    domains = result["domains"]
    lines = [f"Testbed `{Path(result['testbed']).name}`; {result['calib_samples']} calibration windows per domain "
             f"(the only text repair and distillation see), {result['eval_sequences']} held-out windows per domain; "
             f"expert criterion {result['expert_method']}; {result['seconds']:.0f} s in all.", "",
             f"`{result['command']}`", "",
             "| cut | repair | " + " | ".join(domains) + " | geo-mean | greedy agree | calib block err | time |",
             "|---|---|" + "---:|" * (len(domains) + 4)]
    for r in result["rows"]:
        err = r["calibration_block_error_ratio"]
        lines.append(f"| {r['cut']} | {r['repair']} | " + " | ".join(f"{r['ratios'][d]:.3f}" for d in domains)
                     + f" | **{r['geo_mean']:.3f}** | {r['agree']:.3f} | "
                     + ("" if err is None else f"×{err:.3f}") + f" | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def _geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


if __name__ == "__main__":
    sys.exit(main())

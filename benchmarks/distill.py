"""Distillation after expert removal on the testbed: held-out perplexity ratio before and after, and wall time.

    python benchmarks/distill.py [--testbed DIR] [--method tcess_top1] [--ratio 0.5] [--steps 200]
                                 [--train experts+routers routers lora+routers] [--lr 1e-4 1e-3]
                                 [--out benchmarks/results/distill]

Every row is one `api.prune` of the testbed with the recipe [{method, ratio}] (the cut alone) or
[{method, ratio}, {method: distill, steps, train, lr}], calibrated and distilled on the testbed's calibration text
(`<domain>.calib.txt`, all four domains); the export is scored on the held-out text (`<domain>.heldout.txt`), which
neither the cut nor the distillation ever reads:

    ratio(domain) = perplexity(export, domain) / perplexity(original, domain),  geo-mean over the domains.

Also reported: the calibration KL(original ‖ student) before and after distillation (the stage's summary), the
distill stage's wall time and the whole prune's, and verify (the export against the recipe's own result).
Writes OUT.json and OUT.md, prints the markdown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from heldout import results_path, save_results

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.eval.perplexity import evaluate_sets
from moeprune.eval.run import EvalOptions
from moeprune.eval.table import ratio_table
from moeprune.io.load import load_model
from moeprune.testbed import build_testbed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--method", default="tcess_top1", help="expert-removal criterion of the cut")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of experts removed")
    ap.add_argument("--steps", type=int, default=200, help="distillation steps")
    ap.add_argument("--train", nargs="+", default=["experts+routers"], help="what each row trains ('+'-joined)")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="learning rates (one row per train x lr)")
    ap.add_argument("--batch-size", type=int, default=4, help="calibration windows per distillation step")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--out", default="benchmarks/results/distill", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    out = results_path(args.out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    tb = build_testbed(args.testbed)
    calib = CalibrateOptions(tb.specs("calib"), samples=args.calib_samples, seq_len=tb.seq_len)
    eval_opts = EvalOptions(max_sequences=args.eval_sequences).for_model(tb.path)
    held = build_sets(eval_opts.data_config(), load_tokenizer(tb.path, None))
    base = evaluate_sets(load_model(tb.path, dtype="float32"), held)
    cut = {"method": args.method, "ratio": args.ratio}
    runs = [("none", None, [cut])] + [
        (train, lr, [cut, {"method": "distill", "steps": args.steps, "train": train.split("+"), "lr": lr,
                           "batch_size": args.batch_size}]) for train in args.train for lr in args.lr]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (train, lr, recipe) in enumerate(runs):
            folder = Path(tmp) / f"run{n}"
            start = time.perf_counter()
            applied, verified = api.prune(tb.path, folder, recipe=recipe, calib=calib)
            seconds = time.perf_counter() - start
            scores = evaluate_sets(load_model(folder, dtype="float32"), held)
            r = ratio_table(base, {"x": scores})["x"]
            summary = applied.report["stages"][-1].get("summary", {}) if lr is not None else {}
            rows.append({"train": train, "lr": lr, "ratios": {d: r[d] for d in base}, "geo_mean": r["mean"],
                         "kl_start": summary.get("kl_start"), "kl_end": summary.get("kl_end"),
                         "distill_seconds": summary.get("seconds"), "prune_seconds": round(seconds, 1),
                         "tokens": summary.get("tokens"), "verify": verified.passed})
            print(f"  {train:<16} lr={lr}  geo-mean ×{r['mean']:.3f}  " + " ".join(f"{d} ×{r[d]:.2f}" for d in base)
                  + f"  ({seconds:.0f} s)", flush=True)
    result = {"testbed": str(tb.path), "domains": list(base), "cut": cut, "steps": args.steps,
              "batch_size": args.batch_size, "calib_samples": args.calib_samples,
              "eval_sequences": args.eval_sequences, "threads": torch.get_num_threads(),
              "original": {d: s.perplexity for d, s in base.items()},
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    save_results(out, result, to_markdown(result))
    return 0


def to_markdown(result: dict) -> str:
    domains, cut = result["domains"], result["cut"]
    lines = [f"Testbed `{Path(result['testbed']).name}`: {cut['ratio']:.0%} of experts removed by {cut['method']}, "
             f"then {result['steps']} distillation steps of {result['batch_size']} windows; "
             f"{result['calib_samples']} calibration and {result['eval_sequences']} held-out windows per domain; "
             f"{result['threads']} CPU thread(s), {result['seconds']:.0f} s in all.", "",
             "| train | lr | " + " | ".join(domains) + " | geo-mean | calib KL before → after | distill s | "
             "prune s | verify |", "|---|---:|" + "---:|" * (len(domains) + 1) + "---|---:|---:|---|"]
    for r in result["rows"]:
        kl = "" if r["kl_start"] is None else f"{r['kl_start']:.4f} → {r['kl_end']:.4f}"
        lines.append(f"| {r['train']} | {r['lr'] if r['lr'] is not None else '—'} | "
                     + " | ".join(f"{r['ratios'][d]:.3f}" for d in domains)
                     + f" | **{r['geo_mean']:.3f}** | {kl} | {r['distill_seconds'] or '—'} | {r['prune_seconds']} | "
                     + ("PASS" if r["verify"] else "FAIL") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

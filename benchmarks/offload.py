"""Expert offloading on the testbed (top-2 of 16, 4 MoE layers): an m-expert cache per layer instead of pruning.

`moeprune analyze --offload` on the testbed: the transition predictor trains on the routing of the calibration
text (`data/<domain>.calib.txt`, --calib-samples windows per domain), the caches are simulated on the held-out
text (`data/<domain>.heldout.txt`, the same number of windows, sequences interleaved over the domains). Per cache
size m = k, 2k, 4k and policy (LRU, LFU, predictive prefetch, router look-ahead prefetch, oracle prefetch,
Belady): hit rate, experts and bytes moved per token, predicted time per token at --bandwidth GB/s and --flops
TFLOP/s (offload/timing.py); the predictors' recall / precision per layer, SCH(16, m) on the same tokens, and the
verdict against static pruning for several quality targets. Static pruning's quality: the best criterion of
benchmarks/RESULTS.md "Expert-level methods on the testbed" (`benchmarks/quality.py`, mixed calibration, 64 + 64
windows): naee ×1.052 at 25 %, ×1.895 at 50 % (geo-mean held-out perplexity ratio); --static-quality overrides.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/offload.py [--out benchmarks/results/offload]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from heldout import results_path, save_results

from moeprune.analysis.run import analyze
from moeprune.calibration.run import CalibrateOptions
from moeprune.offload import OffloadOptions, TimingModel
from moeprune.offload.options import parse_quality
from moeprune.offload.run import verdict
from moeprune.testbed import build_testbed

STATIC = "0.25=1.052,0.5=1.895"  # naee, benchmarks/RESULTS.md "Expert-level methods on the testbed"
TARGETS = (1.02, 1.06, 1.10, 2.0)
NAMES = {"lru": "LRU", "lfu": "LFU", "predictive": "predictive", "lookahead": "router look-ahead",
         "oracle": "oracle prefetch", "belady": "Belady"}


def table(o: dict) -> list[str]:
    rows = ["| m | policy | hit rate | experts moved / token | KiB moved / token | time / token (µs) | slowdown |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for r in o["rows"]:
        rows.append(f"| {r['m']} | {NAMES[r['policy']]} | {r['hit_rate']:.4f} | {r['loads_per_token']:.3f} | "
                    f"{r['bytes_per_token'] / 1024:.1f} | {r['time_s'] * 1e6:.2f} | ×{r['slowdown']:.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/offload")
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--bandwidth", type=float, default=25.0)
    ap.add_argument("--flops", type=float, default=100.0)
    ap.add_argument("--static-quality", default=STATIC)
    args = ap.parse_args()
    out = results_path(args.out)
    torch.set_num_threads(1)
    start = time.perf_counter()
    tb = build_testbed(args.testbed)
    calib = CalibrateOptions(tb.specs("calib"), samples=args.calib_samples, seq_len=tb.seq_len, held_out=0)
    static = parse_quality(args.static_quality)
    opts = OffloadOptions(bandwidth=args.bandwidth, tflops=args.flops, heldout=tb.specs("heldout"),
                          static_quality=static, quality_target=TARGETS[0])
    with tempfile.TemporaryDirectory() as tmp:
        res = analyze(tb.path, calib, Path(tmp) / "analysis", offload=opts)
        shutil.copy(Path(tmp) / "analysis" / "offload.png", out.with_suffix(".png"))
    o = res.data["offload"]
    timing = TimingModel.from_checkpoint(tb.path, args.bandwidth, args.flops)
    verdicts = {}
    for target in TARGETS:
        verdicts[target] = verdict({**o, "quality_target": target}, timing, res.data["num_experts"])
    seconds = time.perf_counter() - start
    pr, la_, t = o["predictor"], o["lookahead"], o["timing"]
    md = [f"Testbed `{tb.path.name}` (E = {res.data['num_experts']}, k = {res.data['top_k']}, "
          f"{len(res.data['layers'])} MoE layers); predictor trained on {o['train_tokens']:,} calibration tokens, "
          f"caches simulated on {o['tokens']:,} held-out tokens (cold start, domains interleaved by sequence); "
          f"{seconds:.0f} s.", "",
          f"Timing: one expert = {t['expert_bytes']:,} bytes (stored dtype), β = {t['transfer_s'] * 1e6:.3f} µs at "
          f"{t['bandwidth_gbs']:g} GB/s; compute c = {t['compute_s'] * 1e9:.2f} ns per MoE layer at "
          f"{t['tflops']:g} TFLOP/s; all experts resident: {t['resident_s'] * 1e9:.1f} ns per token.", "",
          *table(o), "",
          "Prefetch guesses for layer ℓ (p = k): the transition predictor from the token's layer ℓ−1 experts, and "
          "layer ℓ's router on layer ℓ−1's MoE block input (look-ahead); recall of the true top-k / precision:", "",
          "| layer | transition recall | transition precision | look-ahead recall | look-ahead precision |",
          "|---:|---:|---:|---:|---:|",
          *[f"| {la} | {pr['recall'][i]:.4f} | {pr['precision'][i]:.4f} | {la_['recall'][i]:.4f} | "
            f"{la_['precision'][i]:.4f} |" for i, la in enumerate(pr["layers"])],
          f"| mean | {pr['mean_recall']:.4f} | {pr['mean_precision']:.4f} | {la_['mean_recall']:.4f} | "
          f"{la_['mean_precision']:.4f} |", "",
          "SCH(16, m) on the same held-out tokens (segment-fixed cache, free switches; locality section): "
          + ", ".join(f"m = {m}: {v:.4f}" for m, v in zip(o["cache_sizes"], o["sch"]["values"], strict=True)
                      if v is not None) + ".", "",
          f"Static pruning quality used: {', '.join(f'{r:g}: ×{q:.3f}' for r, q in sorted(static.items()))}.", ""]
    md += [verdicts[TARGETS[0]]["head"], ""]
    for target, v in verdicts.items():
        md.append(f"- target ×{target:g} ({v['kind']}): {v['decision']}")
    result = {"testbed": str(tb.path), "calib_samples": args.calib_samples, "offload": o,
              "verdicts": {str(k): v for k, v in verdicts.items()}, "seconds": seconds}
    save_results(out, result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

"""Quantization on the testbed: held-out perplexity ratio and checkpoint bytes per scheme × algorithm.

    python benchmarks/quant.py [--testbed DIR] [--schemes w8a16 w4a16 w3a16 w2a16] [--algorithms rtn gptq]
                               [--group-size 32] [--out benchmarks/results/quant]

Every row is one `api.quantize` export (calibration included for GPTQ, on the testbed's calibration text), reloaded
with `moeprune.load_model` and scored on the held-out text that calibration never sees:
    ratio(domain) = perplexity(export, domain) / perplexity(original, domain), geo-mean over the domains;
bytes = the export's safetensors tensor bytes (whole checkpoint), against the original's. Writes OUT.json/OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from heldout import HeldOut

from moeprune import api


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", help="testbed folder (default: the cached one, built when missing)")
    ap.add_argument("--schemes", nargs="+", default=["w8a16", "w4a16", "w3a16", "w2a16"])
    ap.add_argument("--algorithms", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows per domain")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--out", default="benchmarks/results/quant", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        sys.exit(f"--out {out}: folder {out.parent} does not exist")
    torch.set_num_threads(1)
    h = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    tb, domains, calib = h.tb, h.domains, h.calib
    rows = []
    for scheme in args.schemes:
        for algorithm in args.algorithms:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                applied, _ = api.quantize(tb.path, Path(tmp) / "out", scheme=scheme, algorithm=algorithm,
                                          group_size=args.group_size, calib=calib if algorithm == "gptq" else None,
                                          run_verify=False)
                seconds = time.perf_counter() - t
                ratios, geo = h.score(applied.out)
                report = applied.report
            row = {"scheme": scheme, "algorithm": algorithm, "group_size": args.group_size,
                   "ratios": ratios, "geo_mean": geo,
                   "bytes": report["weight_bytes_after"], "bytes_before": report["weight_bytes_before"],
                   "rtn_fallbacks": sum(len(v) for v in report["rtn_fallbacks"].values()),
                   "seconds": round(seconds, 1)}
            rows.append(row)
            print(f"  {scheme} {algorithm:<4} ppl ×{geo:.4f} bytes {row['bytes']:,} "
                  f"({row['bytes'] / row['bytes_before']:.3f}) fallbacks {row['rtn_fallbacks']} {seconds:.1f} s",
                  flush=True)
    result = {"testbed": str(tb.path), "domains": domains, "calib_samples": args.calib_samples, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


def to_markdown(result: dict) -> str:
    domains = result["domains"]
    lines = ["| scheme | algorithm | held-out ppl ratio (geo-mean) | " + " | ".join(domains)
             + " | bytes (of original) | RTN fallbacks | s |",
             "|---|---|---|" + "---|" * len(domains) + "---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['scheme']} | {r['algorithm']} | ×{r['geo_mean']:.4f} | "
                     + " | ".join(f"×{r['ratios'][d]:.4f}" for d in domains)
                     + f" | {r['bytes']:,} ({r['bytes'] / r['bytes_before']:.3f}) | {r['rtn_fallbacks']} | "
                       f"{r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

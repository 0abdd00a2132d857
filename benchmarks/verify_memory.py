"""Benchmark: peak host memory of `verify`, layer by layer (`lazy=True`) vs whole models.

What is measured
    A synthetic qwen3_moe checkpoint (random bf16 weights, per-expert layout on disk) with `--layers` MoE decoder
    layers of ~150 MB each (E=64, H=1024, I=384) and its export with 25% of the experts removed (data-free
    `aimer` plan, in-memory apply) are built in a temporary folder. Then, each in a fresh subprocess,
    `verify(original, export, dtype=--dtype)` runs whole (both models loaded in turn by `load_model`) and
    layer by layer (`lazy=True`) on `--rows` seeded rows of `--seq-len` tokens, `--chunk` rows per forward.
    Peak RSS is the child's VmHWM (/proc/self/status) minus its VmHWM right after the imports. MB = 2**20 bytes.
    The parent checks that both modes report the same logits figure.

Expectation: lazy ~ embeddings + heads of both models + one decoder layer + cached hidden states; whole ~ the
original model plus transformers' loading peak. Logits are compared a chunk of positions at a time (within 256
MiB), so with many rows at a real vocabulary (`--rows 16 --seq-len 512 --vocab 151936`: 5 GB of float32 logits per
model) neither mode holds them whole.

Run:  python benchmarks/verify_memory.py [--layers 6] [--rows 2] [--seq-len 64] [--chunk 8] [--vocab 32768]
          [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lazy_memory import SHAPE, vm_hwm_mb  # noqa: E402  (same model shape and peak-RSS reader; run from benchmarks/)


def child(mode: str, tmp: Path, opts: dict) -> None:
    import torch

    from moeprune import api
    from moeprune.pipeline.verify import seeded_inputs, verify
    from moeprune.tiny import save_tiny

    if mode == "build":
        save_tiny("qwen3_moe", tmp / "ckpt", dtype=torch.bfloat16, max_shard_size="500MB",
                  num_hidden_layers=opts["layers"], **(SHAPE | {"vocab_size": opts["vocab"]}))
        api.apply_plan(tmp / "ckpt", api.make_plan(tmp / "ckpt", "aimer", 0.25), tmp / "export")
        return
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401  (same code in both modes)

    torch.set_num_threads(1)
    imports, t0 = vm_hwm_mb(), time.perf_counter()
    tokens = seeded_inputs(opts["vocab"], opts["rows"], opts["seq_len"], seed=0)  # verify's default inputs
    result = verify(tmp / "ckpt", tmp / "export", dtype=opts["dtype"], tokens=tokens, chunk=opts["chunk"],
                    lazy=mode == "lazy")
    (tmp / f"{mode}.json").write_text(json.dumps(dict(imports=imports, peak=vm_hwm_mb(),
                                                      wall_s=time.perf_counter() - t0, result=result.to_dict())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8, help="rows per forward")
    ap.add_argument("--vocab", type=int, default=SHAPE["vocab_size"])
    ap.add_argument("--dtype", default="float32", help="dtype both models run in (the checkpoint is bf16)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, tmp, opts = args.child
        child(mode, Path(tmp), json.loads(opts))
        return

    from moeprune.io.checkpoint import Checkpoint

    with tempfile.TemporaryDirectory(prefix="moeprune-verify-") as tmp:
        opts = json.dumps(dict(layers=args.layers, rows=args.rows, seq_len=args.seq_len, dtype=args.dtype,
                               chunk=args.chunk, vocab=args.vocab))
        for mode in ("build", "whole", "lazy"):
            subprocess.run([sys.executable, __file__, "--child", mode, tmp, opts], check=True)
        total = Checkpoint.open(Path(tmp) / "ckpt").total_bytes / 2**20
        export = Checkpoint.open(Path(tmp) / "export").total_bytes / 2**20
        res = {m: json.loads((Path(tmp) / f"{m}.json").read_text()) for m in ("whole", "lazy")}
    print(f"qwen3_moe bf16, {args.layers} MoE layers: original {total:.0f} MB, export {export:.0f} MB; "
          f"vocabulary {args.vocab}; {args.rows} rows x {args.seq_len} tokens, {args.chunk} rows per forward, verified "
          f"in {args.dtype}")
    print(f"{'mode':<6} {'peak above imports':>19} {'wall s':>7}  result")
    for m, r in res.items():
        line = f"max|dlogit| {r['result']['max_abs_diff']:.3e} of {r['result']['max_abs_logit']:.3g}"
        print(f"{m:<6} {r['peak'] - r['imports']:>16.0f} MB {r['wall_s']:>7.1f}  {line} passed={r['result']['passed']}")
    w, lz = (res[m]["peak"] - res[m]["imports"] for m in ("whole", "lazy"))
    same = res["whole"]["result"]["max_abs_diff"] == res["lazy"]["result"]["max_abs_diff"]
    print("lazy, relative block error per decoder layer:",
          " ".join(f"{r:.1e}" for r in res["lazy"]["result"]["layer_relative"]))
    print(f"lazy/whole peak above imports: {lz / w:.2f}; same logits figure: {same}")


if __name__ == "__main__":
    main()

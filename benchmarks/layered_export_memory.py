"""Benchmark: peak host memory of a merge export, in memory (`load_model` + `apply_chain` + `save_pretrained`) vs
layer by layer (`export(..., lazy=True)`, `io/layered_export.py`).

What is measured
    A synthetic qwen3_moe checkpoint (random bf16 weights saved by stock `save_pretrained`, per-expert on disk) with
    `--layers` MoE decoder layers of ~150 MB each (E=64, H=1024, I=384, as benchmarks/lazy_memory.py) is built in
    a temporary folder, and a merge plan that merges expert pairs (2j, 2j+1) of every layer (E 64 -> 32) with
    `--merge` (default dern). Each export runs in a fresh subprocess; peak RSS is its VmHWM, "above imports" subtracts
    VmHWM after importing torch, transformers, moeprune and the qwen3_moe modeling code. The parent checks that
    both exports hold identical tensors. MB = 2**20 bytes.

Expectation: layer by layer ~ embeddings + one or two layers + one output shard (`--max-shard-size`); in memory
~ the whole model plus save_pretrained's temporaries.

Run:  python benchmarks/layered_export_memory.py [--layers 8] [--merge dern] [--max-shard-size 500MB]
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


def child(mode: str, path: Path, out: Path, opts: dict) -> None:
    import torch

    from moeprune.merge.plan import MergePlan
    from moeprune.pipeline.run import apply
    from moeprune.stages.merge import MERGE
    from moeprune.tiny import save_tiny

    if mode == "build":
        save_tiny("qwen3_moe", path, dtype=torch.bfloat16, max_shard_size="500MB",
                  num_hidden_layers=opts["layers"], **SHAPE)
        return
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401  (same code in both modes)

    torch.set_num_threads(1)
    imports = vm_hwm_mb()
    E = SHAPE["num_experts"]
    groups = {layer: [[2 * j, 2 * j + 1] for j in range(E // 2)] for layer in range(opts["layers"])}
    plan = MergePlan(groups, E, method="pairs", ratio=0.5, model_type="qwen3_moe", merge=opts["merge"])
    t0 = time.perf_counter()
    apply(path, [(MERGE, plan)], out / mode, lazy=mode == "layered", max_shard_size=opts["max_shard_size"])
    (out / f"{mode}.json").write_text(json.dumps(dict(imports=imports, peak=vm_hwm_mb(),
                                                      wall_s=time.perf_counter() - t0)))


def run_child(mode: str, path: Path, out: Path, opts: dict) -> None:
    subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(out), json.dumps(opts)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--merge", default="dern", choices=("average", "svd", "dern"))
    ap.add_argument("--max-shard-size", default="500MB")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, path, out, opts = args.child
        child(mode, Path(path), Path(out), json.loads(opts))
        return

    import torch
    from safetensors.torch import load_file

    from moeprune.io.checkpoint import Checkpoint

    with tempfile.TemporaryDirectory(prefix="moeprune-layered-") as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "out"
        out.mkdir()
        opts = dict(layers=args.layers, merge=args.merge, max_shard_size=args.max_shard_size)
        run_child("build", ckpt, out, opts)
        total = Checkpoint.open(ckpt).total_bytes / 2**20
        layer = sum(e.nbytes for e in Checkpoint.open(ckpt).entries if ".layers.1." in e.name) / 2**20
        for mode in ("in-memory", "layered"):
            run_child(mode, ckpt, out, opts)
        res = {m: json.loads((out / f"{m}.json").read_text()) for m in ("in-memory", "layered")}
        same = True
        a = {k: v for f in sorted((out / "in-memory").glob("model*.safetensors")) for k, v in load_file(f).items()}
        for f in sorted((out / "layered").glob("model*.safetensors")):
            for k, v in load_file(f).items():
                same &= k in a and torch.equal(a.pop(k), v)
        same &= not a
    print(f"checkpoint: qwen3_moe bf16, {args.layers} MoE layers, {total:.0f} MB in all, {layer:.0f} MB per decoder "
          f"layer; {args.merge} merge of expert pairs (64 -> 32); shards of {args.max_shard_size}")
    print(f"{'mode':<10} {'after imports':>14} {'peak':>8} {'peak above imports':>19} {'total s':>8}")
    for m, r in res.items():
        print(f"{m:<10} {r['imports']:>11.0f} MB {r['peak']:>5.0f} MB {r['peak'] - r['imports']:>16.0f} MB "
              f"{r['wall_s']:>8.1f}")
    e, lz = (res[m]["peak"] - res[m]["imports"] for m in ("in-memory", "layered"))
    print(f"layered/in-memory peak above imports: {lz / e:.2f}; identical tensors: {same}")


if __name__ == "__main__":
    main()

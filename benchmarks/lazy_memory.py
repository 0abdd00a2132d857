"""Benchmark: peak host memory of layer-by-layer calibration, lazy (`io/lazy.py`) vs eager (`load_model`).

What is measured
    A synthetic qwen3_moe checkpoint (random bf16 weights, saved by stock `save_pretrained`, so experts are in the
    Hub's per-expert layout) with `--layers` MoE decoder layers of ~150 MB each (E=64 experts, H=1024, I=384) is
    built in a temporary folder. Then, each in a fresh subprocess:
      eager  load_model(path) + capture + run_layers(model, adapter, batches)
      lazy   load_lazy(path)  + capture + run_layers(model, adapter, batches, layer_context=lazy.layer)
    on `--batches` batches of 2 sequences x `--seq-len` tokens. Peak RSS is the child's VmHWM
    (/proc/self/status; ru_maxrss is not used because Linux carries the parent's peak over fork+exec);
    "above imports" subtracts its VmHWM right after importing torch, transformers, moeprune and the qwen3_moe
    modeling code. Each child saves its final hidden states and the parent checks that both modes agree bit for
    bit. MB = 2**20 bytes.

Expectation: lazy peak above imports ~ embeddings + one layer + transformers' conversion temporaries (stacking
per-expert tensors into fused ones briefly holds ~1/3 to 2/3 of a layer twice) + glibc heap retention; eager
~ the whole model (from_pretrained's own peak is larger than the checkpoint).

With --fp8 the checkpoint is then re-written FP8 block-quantized as DeepSeek-V3 / Qwen3-FP8 ship (float8_e4m3fn
linear weights in [128, 128] blocks with float32 `weight_scale_inv`, by transformers' `Fp8Quantize`; embeddings,
head and routers left bf16), and eager loading dequantizes it as transformers does on CPU (`load_model` =
from_pretrained, which falls back to `dequantize=True` without a GPU), lazy loading layer by layer.

Run:  python benchmarks/lazy_memory.py [--layers 8] [--batches 2] [--seq-len 128] [--fp8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=1024, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=4,
             num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32768, mlp_only_layers=[])


def vm_hwm_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(mode: str, path: Path, out: Path, opts: dict) -> None:
    import torch

    from moeprune.calibration.engine import capture, run_layers
    from moeprune.io.lazy import load_lazy
    from moeprune.io.load import load_model
    from moeprune.models import get_adapter
    from moeprune.pipeline.verify import seeded_inputs
    from moeprune.tiny import save_tiny

    if mode == "build":
        save_tiny("qwen3_moe", path, dtype=torch.bfloat16, max_shard_size="500MB",
                  num_hidden_layers=opts["layers"], **SHAPE)
        if opts["fp8"]:
            to_fp8(path)
        return
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401  (~150 MB of code, in both modes)

    torch.set_num_threads(2)
    imports = vm_hwm_mb()
    t0 = time.perf_counter()
    if mode == "lazy":
        lazy = load_lazy(path)
        model, context = lazy.model, lazy.layer
    else:
        model, context = load_model(path), None
    loaded, t_load = vm_hwm_mb(), time.perf_counter() - t0
    adapter = get_adapter(model.config)
    inputs = [seeded_inputs(SHAPE["vocab_size"], batch=2, seq_len=opts["seq_len"], seed=s)
              for s in range(opts["batches"])]
    cached = [capture(model, adapter, x["input_ids"], x["attention_mask"]) for x in inputs]  # hidden [2, S, H]
    for _ in run_layers(model, adapter, cached, layer_context=context):
        pass
    wall = time.perf_counter() - t0
    torch.save([b.hidden for b in cached], out / f"{mode}.pt")
    (out / f"{mode}.json").write_text(json.dumps(dict(imports=imports, loaded=loaded, peak=vm_hwm_mb(),
                                                      load_s=t_load, wall_s=wall)))


def to_fp8(path: Path, block: tuple[int, int] = (128, 128)) -> None:
    """Re-write a saved checkpoint FP8 block-quantized, shard by shard, and add its quantization_config."""
    import re

    from safetensors.torch import load_file, save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    op = Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=list(block))))
    weight_map = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors = {}
        for name, t in load_file(str(shard)).items():
            linear = t.dim() == 2 and name.endswith(".weight") and not re.search(r"embed|lm_head|\.mlp\.gate\.", name)
            tensors.update(op.convert({name: t}) if linear else {name: t})
        save_file(tensors, str(shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    index = path / "model.safetensors.index.json"
    if index.exists():
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def run_child(mode: str, path: Path, out: Path, opts: dict) -> None:
    subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(out), json.dumps(opts)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--fp8", action="store_true", help="FP8 block-quantized checkpoint (dequantized on load)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, path, out, opts = args.child
        child(mode, Path(path), Path(out), json.loads(opts))
        return

    import torch

    from moeprune.io.checkpoint import Checkpoint

    with tempfile.TemporaryDirectory(prefix="moeprune-lazy-") as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "out"
        out.mkdir()
        opts = dict(layers=args.layers, batches=args.batches, seq_len=args.seq_len, fp8=args.fp8)
        run_child("build", ckpt, out, opts)
        total = Checkpoint.open(ckpt).total_bytes / 2**20
        layer = sum(e.nbytes for e in Checkpoint.open(ckpt).entries if ".layers.1." in e.name) / 2**20
        for mode in ("eager", "lazy"):
            run_child(mode, ckpt, out, opts)
        res = {m: json.loads((out / f"{m}.json").read_text()) for m in ("eager", "lazy")}
        same = all(torch.equal(a, b) for a, b in zip(torch.load(out / "eager.pt"), torch.load(out / "lazy.pt"),
                                                    strict=True))
    fmt = "FP8 [128, 128] blocks" if args.fp8 else "bf16"
    print(f"checkpoint: qwen3_moe {fmt}, {args.layers} MoE layers, {total:.0f} MB in all, {layer:.0f} MB per "
          f"decoder layer; {args.batches} batches x 2 x {args.seq_len} tokens")
    print(f"{'mode':<6} {'after imports':>14} {'after load':>11} {'peak':>8} {'peak above imports':>19} "
          f"{'load s':>7} {'total s':>8}")
    for m, r in res.items():
        print(f"{m:<6} {r['imports']:>11.0f} MB {r['loaded']:>8.0f} MB {r['peak']:>5.0f} MB "
              f"{r['peak'] - r['imports']:>16.0f} MB {r['load_s']:>7.1f} {r['wall_s']:>8.1f}")
    e, lz = (res[m]["peak"] - res[m]["imports"] for m in ("eager", "lazy"))
    print(f"lazy/eager peak above imports: {lz / e:.2f}; final hidden states identical: {same}")


if __name__ == "__main__":
    main()

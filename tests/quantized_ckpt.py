"""Tiny quantized checkpoints for the tests (FP8 block-quantized DeepSeek-V3 / Qwen3-MoE, MXFP4 gpt-oss), and the
independent references they are checked against.

FP8 is written with transformers' own `Fp8Quantize` op (it runs on CPU); MXFP4 is packed by the format's definition
(OCP Microscaling spec: 32 e2m1 values per block, two per byte with the lower index in the low nibble, one e8m0 scale
2**(s - 127) per block), checked against transformers' unpacking in `test_quantized.py`. References are always built
by transformers (dequantizing loads) or read from the source files with safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config, Mxfp4Config

from moeprune.io.checkpoint import INDEX_NAME
from moeprune.io.stock import auto_class
from moeprune.tiny import save_tiny

FP8_BLOCK = [16, 16]  # tiny widths (32, 48, 16) are multiples; DeepSeek's kv_a_proj (24 rows) is left unquantized
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # code -> value
HF_CONFIG = {"fp8": FineGrainedFP8Config, "mxfp4": Mxfp4Config}
# case -> (family, format, tiny overrides): gpt-oss needs its expert width a multiple of the MXFP4 block (32)
CASES = {"fp8-qwen3_moe": ("qwen3_moe", "fp8", {}), "fp8-deepseek_v3": ("deepseek_v3", "fp8", {}),
         "mxfp4-gpt_oss": ("gpt_oss", "mxfp4", {"intermediate_size": 32})}
# drop 2 of 8 experts per MoE layer, one per router group of 4 (DeepSeek's group-limited routing needs that)
DROPPED = ([2, 5], [0, 7], [3, 4])




def fp8_quantize(name: str, t: torch.Tensor, block: list[int], routers: bool = False,
                 pad: bool = False) -> dict[str, torch.Tensor] | None:
    """transformers' Fp8Quantize on the linear weights a FP8 release quantizes (not embeddings, head, and routers
    unless `routers`); with `pad`, matrices that end in a partial block too (scales [ceil(rows/b0), ceil(cols/b1)])."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    skip = r"embed_tokens|lm_head" if routers else r"embed_tokens|lm_head|\.mlp\.gate\."
    if t.dim() != 2 or not name.endswith(".weight") or re.search(skip, name):
        return None
    op = Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=block)))
    rows, cols = t.shape
    if pad:  # quantize as if zero-padded to whole blocks (zeros change no block's max), then crop: DeepSeek's way
        padded = torch.nn.functional.pad(t, (0, -cols % block[1], 0, -rows % block[0]))
        out = op.convert({name: padded})
        out[name] = out[name][:rows, :cols].contiguous()
    else:
        out = op.convert({name: t})
    return out if len(out) == 2 else None  # Fp8Quantize leaves shapes that are not whole blocks unquantized


def mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss expert weight [E, in, out] -> blocks uint8 [E, out, in/32, 16], scales uint8 (e8m0) [E, out, in/32]."""
    wt = w.float().transpose(1, 2)  # [E, out, in]: MXFP4 blocks run along the input dim
    E, O, n_in = wt.shape
    groups = wt.reshape(E, O, n_in // 32, 32)  # [E, out, G, 32]
    amax = groups.abs().amax(-1)  # [E, out, G]
    exp = torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / 6.0)).clamp(-127, 127)  # |v| / 2**exp <= 6 (max e2m1)
    scaled = groups / torch.exp2(exp)[..., None]  # [E, out, G, 32]
    codes = (scaled[..., None] - torch.tensor(E2M1)).abs().argmin(-1).to(torch.uint8)  # [E, out, G, 32] nearest
    pairs = codes.reshape(E, O, n_in // 32, 16, 2)  # [E, out, G, 16, 2]
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous(), (exp + 127).to(torch.uint8).contiguous()


def quantized_checkpoint(family: str, fmt: str, dst: Path, block: list[int] = FP8_BLOCK, routers: bool = False,
                         pad: bool = False, **overrides) -> Path:
    """A tiny bf16 checkpoint of `family` (two shards), re-written in format `fmt` with its quantization_config
    (FP8: `block`, routers quantized too when `routers`, partial blocks when `pad`)."""
    src = save_tiny(family, dst.parent / f"{dst.name}-bf16", seed=1, dtype=torch.bfloat16, max_shard_size="60KB",
                    **overrides)
    shutil.copytree(src, dst)
    weight_map, not_converted = {}, []
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = {}
        for name, t in load_file(str(shard)).items():
            if fmt == "fp8":
                q = fp8_quantize(name, t, block, routers, pad)
                if q is None and t.dim() == 2 and name.endswith(".weight"):
                    not_converted.append(name.removesuffix(".weight"))
            else:
                q = None
                if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    blocks, scales = mxfp4_pack(t)
                    q = {name + "_blocks": blocks, name + "_scales": scales}
            tensors.update(q if q is not None else {name: t})
        save_file(tensors, str(shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    index = json.loads((dst / INDEX_NAME).read_text())
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(index["weight_map"]) > 0 and len(set(weight_map.values())) > 1  # really sharded
    config = json.loads((dst / "config.json").read_text())
    if fmt == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         "weight_block_size": block, "modules_to_not_convert": not_converted}
    else:
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def load_dequantized(path: Path, dtype=torch.bfloat16):
    """The independent reference: stock from_pretrained, dequantizing with <Format>Config(dequantize=True)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    qcfg = HF_CONFIG[config.quantization_config["quant_method"]](dequantize=True)
    return auto_class(config).from_pretrained(str(path), quantization_config=qcfg, dtype=dtype,
                                              local_files_only=True).eval()


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)  # byte view: bit-exact comparison whatever the dtype (float8 too)

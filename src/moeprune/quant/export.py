"""A saved folder rewritten as a compressed-tensors checkpoint (what `from_pretrained` and vLLM load).

For every quantized matrix of the plan, its on-disk `PREFIX.weight` is replaced by what compressed-tensors'
pack-quantized compressor (`BaseCompressor` registry) makes of (q, s, z):

    PREFIX.weight_packed      int32 [out, ⌈in·b/32⌉]      b-bit integers packed densely (32 values in b words)
    PREFIX.weight_scale       [out, in/g]                 the scales, in the model's dtype
    PREFIX.weight_shape       int64 [2]                   (out, in)
    PREFIX.weight_zero_point  int32 [⌈out·b/32⌉, in/g]    asymmetric only (packed along the output dimension)
and config.json gets `quantization_config` (quant_method compressed-tensors, format pack-quantized, status
compressed) written by compressed-tensors' own `ModelCompressor.update_config`, with one config group per bit width:

    routed experts   targets "re:.*layers\\.ℓ\\.mlp\\.experts\\.\\d+\\.(gate_proj|up_proj|down_proj)$" per layer
                     (or "...experts\\.(i|j)\\...." for the experts of a layer that differ); the conversion mapping of
                     the family stacks the per-expert tensors into the fused in-memory parameters at load
    other modules    their exact names (model.layers.ℓ.self_attn.q_proj, ...), in groups of their own
Per-expert keys are the on-disk layout the family's checkpoints use (`mlp.experts.J.gate_proj`), so only families
saved per expert are exported (`per_expert_on_disk`). Packed values are checked against (q, s, z) after packing.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.models.layouts import MLP_NAMES
from moeprune.quant.gptq import Quantized
from moeprune.quant.plan import QuantPlan
from moeprune.quant.rtn import dequantize
from moeprune.quant.scheme import QuantScheme

FORMAT = "pack-quantized"
ROLE_OF = {name: role for role, names in MLP_NAMES.items() for name in names}  # gate_proj -> gate, w1 -> gate


def per_expert_on_disk(adapter: MoEAdapter) -> bool:
    """Whether the family's checkpoints store routed experts one by one (so compressed-tensors packs them per expert
    and transformers' conversion mapping stacks them at load), as the mapping's `MergeModulelist` says."""
    from moeprune.compat import get_checkpoint_conversion_mapping

    mapping = get_checkpoint_conversion_mapping(getattr(adapter.root_config, "model_type", adapter.model_type)) or []
    return any(type(op).__name__ == "MergeModulelist" for c in mapping for op in getattr(c, "operations", []))


def ct_scheme(scheme: QuantScheme, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=targets, format=FORMAT, weights=QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy="group", group_size=scheme.group_size))


def disk_keys(ckpt: Checkpoint, adapter: MoEAdapter, plan: QuantPlan) -> dict[str, str]:
    """Plan target key -> on-disk module prefix (the weight's key without ".weight")."""
    out = {}
    module_keys = {}
    for name in ckpt.names():
        if not name.endswith(".weight"):
            continue
        role = adapter.classify_key(name)
        if role.kind == "expert":
            proj = role.suffix.removeprefix(".").removesuffix(".weight")
            if proj in ROLE_OF:
                out[f"layer.{role.layer}.expert.{role.expert}.{ROLE_OF[proj]}"] = name.removesuffix(".weight")
            continue
        m = re.match(r"^(?:.*\.)?layers\.(\d+)\.(.+)\.weight$", name)
        if m:
            module_keys[f"layer.{m.group(1)}.module.{m.group(2)}"] = name.removesuffix(".weight")
    out.update(module_keys)
    missing = [k for k in plan.tensors if k not in out]
    if missing:
        raise MoePruneError(f"the saved checkpoint has no weight for {missing[:3]} ({len(missing)} in all): this "
                            "family's on-disk layout is not one the quantization export knows.")
    return {k: out[k] for k in plan.tensors}


def compress(r: Quantized, scheme: QuantScheme, where: str) -> dict[str, torch.Tensor]:
    """(q, s, z) -> compressed-tensors' pack-quantized tensors (names without the module prefix), checked."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    args = ct_scheme(scheme, [where])
    w_hat = dequantize(r.q, r.scale.float(), r.zero, scheme.group_size)  # [out, in] float32: (q − z)·s
    state = {"weight": w_hat, "weight_scale": r.scale.float()}
    if r.zero is not None:
        state["weight_zero_point"] = r.zero
    packed = compressor.compress(state, args)
    packed["weight_scale"] = r.scale.clone()  # stored in the model's dtype
    back = compressor.decompress(dict(packed), args)["weight"]
    want = dequantize(r.q, r.scale, r.zero, scheme.group_size)
    if not torch.equal(back.to(want.dtype), want):
        raise MoePruneError(f"{where}: compressed-tensors' packing does not give back the quantized weight "
                            f"(max difference {float((back.float() - want.float()).abs().max()):.3g}); not writing it.")
    return packed


def _expert_targets(prefixes: dict[str, str], keys: list[str], by_layer_experts: dict[int, set[int]],
                    num_experts: int) -> list[str]:
    """`re:` targets for the routed experts `keys` (one per layer; the experts listed where not all of them)."""
    out = []
    for layer, experts in sorted(by_layer_experts.items()):
        sample = prefixes[next(k for k in keys if k.startswith(f"layer.{layer}.expert."))]
        m = re.match(rf"^(?:.*\.)?(layers\.{layer}\.(?:.+\.)?)(\d+)\.([^.]+)$", sample)
        head = re.escape(m.group(1))
        projs = sorted({prefixes[k].rpartition(".")[2] for k in keys if k.startswith(f"layer.{layer}.expert.")})
        which = r"\d+" if len(experts) == num_experts else "(" + "|".join(str(j) for j in sorted(experts)) + ")"
        out.append(f"re:.*{head}{which}\\.({'|'.join(projs)})$")
    return out


def config_groups(plan: QuantPlan, prefixes: dict[str, str]) -> dict:
    """One group per (bit width, routed or not), routed-expert groups first (transformers takes the first)."""
    routed: dict[int, list[str]] = defaultdict(list)
    dense: dict[int, list[str]] = defaultdict(list)
    for key, b in plan.bits.items():
        (routed if ".expert." in key else dense)[b].append(key)
    groups = {}
    for b, keys in sorted(routed.items(), key=lambda kv: -len(kv[1])):
        by_layer: dict[int, set[int]] = defaultdict(set)
        for k in keys:
            p = k.split(".")
            by_layer[int(p[1])].add(int(p[3]))
        targets = _expert_targets(prefixes, keys, by_layer, plan.num_experts)
        groups[f"experts_w{b}"] = ct_scheme(plan.scheme.with_bits(b), targets)
    for b, keys in sorted(dense.items()):
        groups[f"dense_w{b}"] = ct_scheme(plan.scheme.with_bits(b), sorted(prefixes[k] for k in keys))
    return groups


def write_compressed(folder: Path, plan: QuantPlan) -> dict:
    """Rewrite `folder` (a saved plain checkpoint, inside the export's temporary folder) in place; the byte counts."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    ckpt = Checkpoint.open(folder)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    prefixes = disk_keys(ckpt, adapter, plan)
    by_prefix = {p: k for k, p in prefixes.items()}
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    packed_bytes = 0
    for file in ckpt.files:
        tensors = load_file(str(file))
        out, changed = {}, False
        for name, t in tensors.items():
            key = by_prefix.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
            if key is None:
                out[name] = t
                continue
            prefix = name.removesuffix(".weight")
            for suffix, v in compress(plan.tensors[key], plan.scheme.with_bits(plan.bits[key]), prefix).items():
                out[f"{prefix}.{suffix}"] = v.contiguous()
                packed_bytes += v.numel() * v.element_size()
                if index is not None:
                    index["weight_map"][f"{prefix}.{suffix}"] = file.name
            if index is not None:
                index["weight_map"].pop(name, None)
            changed = True
        if changed:
            tmp = file.with_name(file.name + ".tmp")
            save_file(out, str(tmp), metadata={"format": "pt"})
            tmp.replace(file)
    if index is not None:
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index.setdefault("metadata", {})["total_size"] = Checkpoint.open(folder).total_bytes
        index_file.write_text(json.dumps(index, indent=2))
    qconfig = QuantizationConfig(config_groups=config_groups(plan, prefixes), format=FORMAT,
                                 quantization_status="compressed")
    ModelCompressor(quantization_config=qconfig).update_config(str(folder))
    return {"quantized_tensor_bytes": packed_bytes, "quantized_matrices": len(prefixes),
            "checkpoint_bytes": Checkpoint.open(folder).total_bytes}

"""What a checkpoint's bytes are made of, read from its safetensors headers (no weights loaded).

    total = fixed + router_per_expert · E · (kept share) + Σ_layers Σ_experts bytes(expert)

`fixed` = every tensor that is neither a routed expert's nor a router row's (attention, norms, embeddings, shared
experts, dense MLPs) at its stored dtype; routers lose the rows of removed experts; an expert is `ExpertShape`
(quant/sizes.py), which must reproduce the stored expert bytes exactly or the checkpoint is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.quant.sizes import STORED, ExpertShape, PackedFormat


@dataclass(frozen=True)
class ModelSizes:
    total: int  # bytes of every tensor
    fixed: int  # bytes that no expert removal or quantization changes
    router: int  # bytes of router rows, summed over MoE layers (scales with the kept share of experts)
    expert: ExpertShape  # one routed expert (every MoE layer alike)
    num_experts: int
    layers: tuple[int, ...]

    def fixed_after(self, kept_experts: int) -> int:
        """Bytes outside the routed experts when every MoE layer keeps `kept_experts` of E."""
        return self.fixed + self.router * kept_experts // self.num_experts


def model_sizes(path: str | Path) -> tuple[ModelSizes, MoEAdapter, Checkpoint]:
    ckpt = Checkpoint.open(path)
    if ckpt.quantization is not None:
        raise MoePruneError(f"{ckpt.path} is already quantized ({type(ckpt.quantization).__name__}); its experts "
                            "cannot be quantized again (dequantize errors would compound, and the stored widths are "
                            "not the ones this tool sizes). Start from the unquantized checkpoint.")
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    E, layers = adapter.num_experts, adapter.moe_layers()
    width, hidden = adapter.expert_width, getattr(adapter.config, "hidden_size", None)
    if width is None or hidden is None:
        raise MoePruneError(f"{ckpt.path}: the config gives no expert width or hidden size; cannot size experts.")
    expert_bytes = router = other = 0
    dtypes = set()
    for entry in ckpt.entries:
        role = adapter.classify_key(entry.name)
        if role.kind in ("expert", "fused"):
            expert_bytes += entry.nbytes
            dtypes.add(entry.nbytes // max(1, _numel(entry.shape)))
        elif role.kind == "router":
            router += entry.nbytes
        else:
            other += entry.nbytes
    if len(dtypes) != 1:
        raise MoePruneError(f"{ckpt.path}: routed experts stored in {len(dtypes)} dtypes; mixed storage is not sized.")
    stored = dtypes.pop()
    for gated in (True, False):
        for biased in (False, True):
            shape = ExpertShape(hidden, width, gated, stored, biased)
            if shape.bytes(STORED, PackedFormat()) * E * len(layers) == expert_bytes:
                return ModelSizes(ckpt.total_bytes, other, router, shape, E, tuple(layers)), adapter, ckpt
    raise MoePruneError(f"{ckpt.path}: routed experts take {expert_bytes:,} bytes, which matches no gate/up/down "
                        f"layout of width {width} and hidden size {hidden} ({E} experts × {len(layers)} layers); "
                        "non-uniform expert widths are not sized.")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n

"""Mixed precision inside the quantize stage: a budget (`avg_bits` or `max_bytes`) turned into the `bits` option.

    costs  = ExpertCosts.from_shapes(routed expert shapes, widths, pack-quantized format)     (shapes only)
    budget = AvgBits(B):  Σ_e b_e·n_e ≤ B·Σ_e n_e
           | MaxBytes(X): fixed + Σ_e bytes(e, b_e) ≤ X,   fixed = Σ (non-expert tensors' numel) · d
                          (d = bytes of the stored dtype; every tensor the export writes that is no routed expert
                          weight: embeddings, attention, norms, routers, shared experts, head when untied)
    check  = check_budget(costs, budget, granularity)             refused in `check`, before any calibration
    loss   = loss[j, b] = Σ_k ω[j, k] · err[j, k, b]             (quant/importance.py: pmq from the routed statistics
             of the calibration engine, camera from neuron statistics; err from the stage's own RTN quantizer)
    alloc  = allocate(costs.with_loss(loss), budget, granularity) (quant/allocate.py, scipy milp)
    bits   = {layer: b} (granularity layer) or {layer: {expert: b}} (granularity expert), as the `bits` option reads
For granularity expert the per-layer lift (`lift_per_layer`) is solved too and its predicted loss reported.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.quant.allocate import (
    GRANULARITIES,
    Allocation,
    AvgBits,
    Budget,
    ExpertCosts,
    MaxBytes,
    allocate,
    check_budget,
    check_widths,
    lift_per_layer,
)
from moeprune.quant.importance import IMPORTANCE, ImportanceInputs, MicroErrors, loss_tables, micro_errors
from moeprune.quant.rtn import fake_quantize
from moeprune.quant.sizes import STORED, ExpertShape, PackedFormat

DEFAULT_IMPORTANCE = "camera"  # benchmarks/RESULTS.md, "Pareto": CAMERA-Q avoided PMQ's one large loss (2.5 bits
# per layer ×1.0022 against ×1.0154), PMQ's wins were ≤ 0.0005; `budget` keeps pmq (a statistics file suffices)
DEFAULT_WIDTHS = (2, 3, 4, 8)
LOADED_BY = ("moeprune.load_model (each module decompressed by its own config group, quant/load.py); not stock "
             "transformers (one config group decodes every expert) and not vLLM (one scheme per fused MoE layer)")


@dataclass(frozen=True)
class MixedSpec:
    """A validated mixed-precision request: budget, importance kind, granularity and allowed widths."""

    budget: Budget
    importance: str
    granularity: str
    widths: tuple[int, ...]

    def needs_routed(self) -> bool:
        return IMPORTANCE.get(self.importance).needs == "routed"

    def describe(self) -> str:
        return f"{self.budget.describe()}, {self.importance} importance, one width per {self.granularity}"


def mixed_spec(avg_bits, max_bytes, allocate_kind, granularity, widths, bits) -> MixedSpec | None:
    """The request of the stage options, or None (no budget); every inconsistent combination refused here."""
    budget_given = avg_bits is not None or max_bytes is not None
    if avg_bits is not None and max_bytes is not None:
        raise MoePruneError("give one budget: avg_bits (--avg-bits) or max_bytes (--max-bytes), not both.")
    if budget_given and bits is not None:
        raise MoePruneError("bits sets the widths by hand and avg_bits/max_bytes asks the allocator to choose them; "
                            "give one of the two.")
    if not budget_given:
        if allocate_kind is not None or granularity is not None or widths is not None:
            raise MoePruneError("allocate/granularity/widths choose widths under a budget: add --avg-bits B or "
                                "--max-bytes X (or drop them for one width everywhere).")
        return None
    kind = allocate_kind or DEFAULT_IMPORTANCE
    IMPORTANCE.get(kind)
    gran = granularity or "layer"
    GRANULARITIES.get(gran)
    allowed = check_widths(DEFAULT_WIDTHS if widths is None else tuple(widths))
    if any(b >= STORED for b in allowed):
        raise MoePruneError(f"widths {allowed}: the quantize stage stores 2..8-bit experts; leave out {STORED}+.")
    if avg_bits is not None:
        budget: Budget = AvgBits(avg_bits)
    else:
        budget = MaxBytes(max_bytes)
    return MixedSpec(budget, kind, gran, allowed)


# ---------------------------------------------------------------------------------------------------- sizes
def expert_shapes(model: nn.Module, adapter: MoEAdapter, stored_bytes: int) -> dict[int, list[ExpertShape]]:
    """ExpertShape of every routed expert per MoE layer, from the (meta) model's expert weights."""
    out = {}
    for layer in adapter.moe_layers():
        roles = adapter.expert_roles(adapter.block(model, layer))
        E, H, I = roles["down"].shape  # (E, H, I)
        out[layer] = [ExpertShape(H, I, "gate" in roles, stored_bytes)] * E
    return out


def fixed_bytes(model: nn.Module, shapes: dict[int, list[ExpertShape]], stored_bytes: int) -> int:
    """Bytes of everything but the routed experts' quantized weights: (Σ state numel − Σ_e n_e) · d. Tied weights
    count once (as the export writes them); non-persistent buffers are not written."""
    seen, numel = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            numel += t.numel()
    experts = sum(s.params for layer in shapes.values() for s in layer)
    return (numel - experts) * stored_bytes


def header_fixed_bytes(ckpt, adapter: MoEAdapter) -> int:
    """Bytes of every stored tensor that is no routed expert's, from the checkpoint's headers (exact, any dtypes):
    what the export copies unchanged when no earlier stage changed the model."""
    return sum(e.nbytes for e in ckpt.entries if adapter.classify_key(e.name).kind not in ("expert", "fused"))


def costs_and_budget(spec: MixedSpec, model: nn.Module, adapter: MoEAdapter, group_size: int, symmetric: bool,
                     stored_bytes: int, fixed: int | None = None) -> tuple[ExpertCosts, Budget]:
    """The cost table and the budget with the model's fixed bytes filled in (max_bytes; `fixed` given: those, else
    counted from the model's tensors); refused when too small."""
    shapes = expert_shapes(model, adapter, stored_bytes)
    costs = ExpertCosts.from_shapes(shapes, spec.widths, PackedFormat(group_size, symmetric, stored_bytes))
    budget = spec.budget
    if isinstance(budget, MaxBytes):
        budget = MaxBytes(budget.total, fixed if fixed is not None else fixed_bytes(model, shapes, stored_bytes))
    check_budget(costs, budget, spec.granularity)
    return costs, budget


# ---------------------------------------------------------------------------------------------------- allocation
LayerContext = Callable[[int], AbstractContextManager]


def model_micro_errors(model: nn.Module, adapter: MoEAdapter, widths: tuple[int, ...], group_size: int,
                       symmetric: bool, store_dtype: torch.dtype,
                       layer_context: LayerContext | None = None) -> dict[int, MicroErrors]:
    """err/norm per micro-expert of every MoE layer with the stage's RTN (weights cast to the stored dtype first,
    as the stage quantizes them), one decoder layer materialised at a time under `layer_context`."""
    context = layer_context or (lambda i: nullcontext())
    layers, out = adapter.moe_layers(), {}

    def fq(w: torch.Tensor, bits: int) -> torch.Tensor:
        return fake_quantize(w.to(store_dtype), bits, group_size, symmetric).to(w.dtype)

    for n, layer in enumerate(bar := tqdm(layers, leave=False)):
        bar.set_description(f"quantization errors (layer {n + 1}/{len(layers)})")
        with context(layer):
            roles = adapter.expert_roles(adapter.block(model, layer))
            out[layer] = micro_errors({k: v.detach() for k, v in roles.items()}, widths, fq)
    return out


@dataclass
class MixedResult:
    allocation: Allocation
    budget: Budget
    lift: dict | None  # granularity expert: lift_per_layer's predicted losses

    def bits_option(self) -> dict:
        """{layer: b} when every layer has one width, else {layer: {expert: b}}."""
        per_layer = self.allocation.per_layer()
        if per_layer is not None:
            return dict(per_layer)
        return {layer: dict(enumerate(bs)) for layer, bs in self.allocation.bits.items()}


def solve(spec: MixedSpec, costs: ExpertCosts, budget: Budget, inputs: ImportanceInputs) -> MixedResult:
    """Loss tables of `spec.importance`, the milp allocation, and (per expert) the per-layer lift."""
    loss = loss_tables(spec.importance, inputs)
    priced = costs.with_loss(loss)
    alloc = allocate(priced, budget, spec.granularity)
    lift = lift_per_layer(priced, alloc, budget).to_dict() if spec.granularity == "expert" else None
    return MixedResult(alloc, budget, lift)


def allocation_summary(spec: MixedSpec, result: MixedResult, costs: ExpertCosts) -> dict:
    """What the report records: budget, importance, bits per layer (and per expert), predicted loss, lift."""
    alloc = result.allocation
    per_layer = alloc.per_layer()
    out = {"budget": result.budget.describe(), "importance": spec.importance, "granularity": spec.granularity,
           "widths": list(spec.widths), "predicted_loss": alloc.loss, "cost": alloc.cost,
           "capacity": alloc.capacity, "unit": alloc.unit, "average_bits": alloc.average_bits(costs),
           "layer_bits": {str(k): v for k, v in per_layer.items()} if per_layer is not None else None,
           "expert_bits": None if per_layer is not None else {str(k): v for k, v in alloc.bits.items()},
           "servable_by": GRANULARITIES.get(spec.granularity).servable if per_layer is None else
           GRANULARITIES.get("layer").servable,
           "loaded_by": LOADED_BY if per_layer is None else "transformers needs one width for all experts: "
           + ("it loads this export" if len({*per_layer.values()}) == 1 else "moeprune.load_model loads this export "
              "(module by module); vLLM serves it (one scheme per fused MoE layer)")}
    if isinstance(result.budget, MaxBytes):
        out["max_bytes"] = result.budget.total
        out["fixed_bytes"] = result.budget.fixed
    else:
        out["avg_bits"] = result.budget.bits
    if result.lift is not None:
        out["lift_per_layer"] = result.lift
    return out

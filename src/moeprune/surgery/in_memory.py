"""Expert removal on an in-memory model.

For each MoE layer with kept experts K (ascending), in lockstep:
    experts:  every expert tensor  W[E, ...] -> W[K, ...]   (fused) or ModuleList[K] (per-expert modules)
    router:   weight [E, H] -> [K, H]; bias [E] and e_score_correction_bias [E] -> [K]
    counts:   num_experts / num_local_experts / n_routed_experts on the block, router, experts and config
Experts are renumbered 0..|K|-1 in the order of K. Z extra router classes without expert weights (LongCat-Flash's
zero experts: router rows and unused gate_up rows E..E+Z-1) stay, as rows K..K+Z-1 (`MoEAdapter.keep_rows`);
module counts equal to E + Z become K + Z.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.models.layouts import layout_of
from moeprune.select.plan import PrunePlan


@torch.no_grad()
def slice_router(adapter: MoEAdapter, block: nn.Module, kept: torch.Tensor) -> None:
    """Slice every tensor that routes by expert (`MoEAdapter.router_tensors`: weight, biases, correction bias)."""
    tensors = adapter.router_tensors(block)
    if not any(n.endswith("weight") and t.dim() == 2 for n, t in tensors.items()):
        raise MoePruneError(f"router {type(adapter.router(block)).__name__} has no weight with "
                            f"{adapter.num_experts} rows to slice.")
    for name, t in tensors.items():
        rows = adapter.keep_rows(kept, t.shape[0]).to(t.device)  # [K (+ Z)]
        adapter.set_router_tensor(block, name, t.data.index_select(0, rows))  # [K (+ Z), ...]


def _update_counts(modules: list[nn.Module], attrs: tuple[str, ...], old: int, new: int, extra: int = 0) -> None:
    """Module attributes equal to E become K; with Z extra router classes, those equal to E + Z become K + Z."""
    change = {old: new, old + extra: new + extra}
    for m in modules:
        for a in attrs:
            value = getattr(m, a, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in change:
                setattr(m, a, change[value])


@torch.no_grad()
def prune_layer(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan, layer: int) -> None:
    """Remove the experts `plan` drops from decoder layer `layer` only (no-op for a layer the plan does not list);
    module attributes follow, `model.config` does not (the caller updates it once for the whole model)."""
    if layer not in plan.kept_experts:
        return
    E = adapter.num_experts
    kept = torch.tensor(plan.kept_experts[layer], dtype=torch.long)  # [K]
    block = adapter.block(model, layer)
    experts = adapter.experts(block)
    layout = layout_of(experts)
    if layout.num_experts(experts) != E:
        raise MoePruneError(f"layer {layer} holds {layout.num_experts(experts)} experts, config says {E}.")
    new_experts = layout.keep(experts, kept)  # extra-class rows (more rows than experts) are kept at the end
    if new_experts is not experts:
        setattr(block, adapter.experts_name, new_experts)
    slice_router(adapter, block, kept)
    _update_counts([block, *adapter.router(block).modules(), *new_experts.modules()], adapter.count_attrs, E,
                   len(kept), adapter.extra_classes)


@torch.no_grad()
def apply_plan(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan) -> nn.Module:
    """Remove the experts `plan` drops, in place: `prune_layer` on every MoE layer, then `model.config` once."""
    plan.validate(adapter)
    for layer in plan.layers:
        prune_layer(model, adapter, plan, layer)
    adapter.set_config_experts(model.config, plan.kept_count)
    E = adapter.num_experts
    logger.info("removed %d of %d experts in %d MoE layers", E - plan.kept_count, E, len(plan.layers))
    return model

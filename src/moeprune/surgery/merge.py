"""Expert merging on an in-memory model: fewer expert slots, merged weights, one router row per merged expert.

For each MoE layer and merge group G_g = [d, m_1, ...] (dominant d first) with usage weights f:
    structure: the dominants are kept exactly as expert removal keeps experts (`surgery.in_memory.prune_layer`:
               expert tensors, router weight/bias/correction bias sliced, every count updated), so merged expert g
               sits at slot g;
    weights:   merged experts := the plan's layer merge (`merge.methods.MERGES[plan.merge]`: per group
               average/svd, or layer-wide dern) of the original experts (canonical roles: gate/up [I, H],
               down [H, I], biases), written back into the fused tensors (through the role views) or the MLPs;
    router:    `dominant` keeps row d (and its bias entries); `weighted` sets every expert-indexed router tensor
               (weight row, bias, e_score_correction_bias) of slot g to Σ_i f_i·t[m_i] / Σ_i f_i.
A group of one keeps its expert unless the layer merge changes it (dern recombines neurons into survivors).
`merge_fn` (one group -> one expert) overrides the plan's merge, per group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.io.memory import COMPUTE_REUSE, reuse_freed_memory
from moeprune.log import logger
from moeprune.merge.methods import MERGES, per_group, unchanged
from moeprune.merge.plan import MergePlan
from moeprune.models.base import MoEAdapter
from moeprune.surgery.in_memory import prune_layer

Expert = dict[str, torch.Tensor]
MergeFn = Callable[[list[Expert], Sequence[float]], Expert]
ROLE_NAMES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def expert_of(roles: dict[str, torch.Tensor], j: int) -> Expert:
    """One expert's canonical tensors from stacked role views [E, ...]: views, not copies (the merges only read
    them; a copy of every expert was a whole layer more at the merge's peak)."""
    return {r: roles[r][j].detach() for r in ROLE_NAMES if r in roles}


def merge_memory(expert: Expert):
    """The memory context of one layer merge: float64 temporaries of about an expert each (alignment features
    [I, 3H], accumulators) reuse the last group's pages, the heap's free top included, instead of faulting fresh
    ones in. One M-SMoE layer of the benchmark checkpoint (128 experts, 32 aligned pairs): 4.3-5.4 -> 2.1-2.6 s,
    890 k -> 70 k page faults (`benchmarks/memory_reuse.py`)."""
    return reuse_freed_memory(max(COMPUTE_REUSE, 2 * 8 * sum(t.numel() for t in expert.values())), keep_top=True)


@torch.no_grad()
def merge_layer(model: nn.Module, adapter: MoEAdapter, plan: MergePlan, layer: int, layer_merge=None) -> None:
    """Merge decoder layer `layer`'s groups in place (no-op for a layer the plan does not list); `model.config` is
    left to the caller. `layer_merge` = the plan's layer merge (built once by the caller, or here)."""
    if layer not in plan.groups:
        return
    layer_merge = layer_merge or MERGES.get(plan.merge)(plan)
    E = adapter.num_experts
    block = adapter.block(model, layer)
    roles = adapter.expert_roles(block)
    experts = [expert_of(roles, j) for j in range(E)]
    with merge_memory(experts[0]):
        merged = layer_merge(experts, plan.groups[layer], plan.weights[layer], layer=layer)
    # a survivor handed back as it is stays where prune_layer keeps it: nothing to write, and no reference to the
    # old layer's tensors left to hold them while prune_layer slices the kept experts out
    merged = [None if unchanged(m, experts, g) else m for m, g in zip(merged, plan.groups[layer], strict=True)]
    del experts
    rows = {n: t.detach().clone() for n, t in adapter.router_tensors(block).items()}  # original rows [E, ...]
    del roles
    prune_layer(model, adapter, plan.as_prune_plan(), layer)  # keep the dominants: structure, router, counts
    block = adapter.block(model, layer)
    for g, m in enumerate(merged):
        if m is None:
            continue
        views = adapter.expert_views(block, g)  # write through to the model's parameters
        for role, t in m.items():
            views[role].copy_(t.to(views[role].dtype))
    if plan.router == "weighted":
        for name, t in adapter.router_tensors(block, len(plan.groups[layer])).items():
            for g, (group, w) in enumerate(zip(plan.groups[layer], plan.weights[layer], strict=True)):
                src = rows[name][group].double()  # [n, ...]
                f = torch.tensor(w, dtype=torch.float64, device=src.device)
                t.data[g] = ((f.view(-1, *[1] * (src.dim() - 1)) * src).sum(0) / f.sum()).to(t.dtype)


@torch.no_grad()
def apply_merge_plan(model: nn.Module, adapter: MoEAdapter, plan: MergePlan,
                     merge_fn: MergeFn | None = None) -> nn.Module:
    """Merge every layer's groups in place (`merge_layer`, each from that layer's original weights), then the
    config once; the model ends with len(groups) experts per MoE layer."""
    plan.validate(adapter)
    layer_merge = per_group(merge_fn) if merge_fn is not None else MERGES.get(plan.merge)(plan)
    E = adapter.num_experts
    L = len(plan.layers)
    for n, layer in enumerate(bar := tqdm(plan.layers, leave=False)):
        bar.set_description(f"merging ({plan.merge}, layer {n + 1}/{L})")
        merge_layer(model, adapter, plan, layer, layer_merge)
    adapter.set_config_experts(model.config, len(next(iter(plan.groups.values()))))
    logger.info("merged %d experts into %d per MoE layer (%s merge, %s router rows)", E,
                len(next(iter(plan.groups.values()))), plan.merge, plan.router)
    return model

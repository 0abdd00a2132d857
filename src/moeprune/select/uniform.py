"""Uniform selection: every MoE layer drops the same number of experts (what stock configs can express).

    n_drop = round(ratio · E)                       (one router group)
    n_drop = n_group · round(ratio · E / n_group)   (group-limited routers: the same drop in every group)

Within a layer (or group) the experts with the lowest keep-score are dropped; ties break towards dropping the
higher index, so results are deterministic.
"""

from __future__ import annotations

import torch

from moeprune.errors import MoePruneError
from moeprune.models.routing import RoutingSpec


def drop_count(ratio: float, num_experts: int, routing: RoutingSpec) -> int:
    """Experts to drop per layer for `ratio`; raises MoePruneError when the ratio is unusable (checked early)."""
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise MoePruneError(f"--ratio must be a fraction strictly between 0 and 1 (e.g. 0.25), got {ratio!r}.")
    groups = routing.n_group if routing.group_limited else 1
    size = num_experts // groups
    per_group = round(ratio * size)
    n_drop = per_group * groups
    if n_drop == 0:
        smallest = 1 / size
        raise MoePruneError(
            f"--ratio {ratio} drops 0 of {num_experts} experts per layer"
            + (f" ({groups} groups of {size})" if groups > 1 else "")
            + f"; use at least {smallest:.3g}."
        )
    kept_per_group = size - per_group
    if num_experts - n_drop < routing.top_k:
        raise MoePruneError(
            f"--ratio {ratio} keeps {num_experts - n_drop} experts per layer, fewer than the router's "
            f"top-{routing.top_k}; use a ratio <= {(num_experts - routing.top_k) / num_experts:.3g}."
        )
    if groups > 1 and kept_per_group < routing.min_experts_per_group():
        need = routing.min_experts_per_group()
        raise MoePruneError(
            f"--ratio {ratio} keeps {kept_per_group} experts per router group but this group-limited router "
            f"needs at least {need} per group; use a ratio <= {(size - need) / size:.3g}."
        )
    return n_drop


def select_uniform(
    scores: dict[int, torch.Tensor], ratio: float, routing: RoutingSpec, higher_keeps: bool = True
) -> dict[int, list[int]]:
    """Kept experts per layer from per-layer scores [E]."""
    kept: dict[int, list[int]] = {}
    for layer, s in sorted(scores.items()):
        E = s.numel()
        n_drop = drop_count(ratio, E, routing)
        groups = routing.n_group if routing.group_limited else 1
        size = E // groups
        keep_score = s.double() if higher_keeps else -s.double()  # [E]
        layer_kept: list[int] = []
        for g in range(groups):
            idx = list(range(g * size, (g + 1) * size))
            # sort by (score ascending, index descending): the first n_drop/groups are dropped
            order = sorted(idx, key=lambda j: (float(keep_score[j]), -j))
            layer_kept.extend(sorted(order[n_drop // groups :]))
        kept[layer] = sorted(layer_kept)
    return kept

"""Non-uniform plans (e.g. from the global policy) and the stock-config limit.

A stock transformers config holds ONE routed-expert count (`num_experts`, `n_routed_experts`, ...), so a plan
keeping different counts per layer cannot be loaded by stock code as is. `pad_to_uniform` lifts every layer to
the largest per-layer count K = max_l |kept_l| by adding back that layer's best-scoring dropped experts:

    kept'_l = kept_l ∪ top_{K − |kept_l|} (dropped_l, by keep-score)     (no scores: lowest indices)

Group-limited routers: every group of a layer is lifted to the largest per-group count, so per-group counts
stay equal. Padding only puts experts back (the export is closer to the original model than the plan, and
saves less memory); the report must say how many experts were padded back.
"""

from __future__ import annotations

from moeprune.errors import MoePruneError
from moeprune.models.routing import RoutingSpec


def _per_group(kept: list[int], groups: int, size: int) -> list[int]:
    return [sum(1 for j in kept if j // size == g) for g in range(groups)]


def pad_to_uniform(
    kept: dict[int, list[int]],
    scores: dict[int, list[float]] | None,
    num_experts: int,
    higher_keeps: bool,
    routing: RoutingSpec,
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(kept lists all of the max per-layer count, ascending; experts added per layer, ascending)."""
    E = num_experts
    if not kept:
        raise MoePruneError("the plan keeps no layers; nothing to pad.")
    groups = routing.n_group if routing.group_limited else 1
    if E % groups:
        raise MoePruneError(f"{E} experts do not split into the router's {groups} equal groups; check the config.")
    size = E // groups
    for layer, experts in sorted(kept.items()):
        if len(set(experts)) != len(experts) or any(not 0 <= j < E for j in experts):
            raise MoePruneError(f"layer {layer}: kept experts {experts} must be unique indices in 0..{E - 1}.")
        if groups > 1 and len(set(_per_group(experts, groups, size))) != 1:
            raise MoePruneError(
                f"layer {layer}: keeps {_per_group(experts, groups, size)} experts per router group; a group-limited "
                "router needs the same count in every group. Re-select with the global or per_group policy."
            )
        if scores is not None and len(scores.get(layer, ())) != E:
            raise MoePruneError(f"layer {layer}: the plan's scores must list {E} values (one per expert).")
    target = max(len(v) for v in kept.values()) // groups  # per group
    padded: dict[int, list[int]] = {}
    added: dict[int, list[int]] = {}
    for layer, experts in sorted(kept.items()):
        have = set(experts)
        extra: list[int] = []
        for g in range(groups):
            dropped = [j for j in range(g * size, (g + 1) * size) if j not in have]
            if scores is not None:
                s = scores[layer]
                dropped.sort(key=lambda j: (-s[j] if higher_keeps else s[j], j))  # best first, ties: lower index
            extra += dropped[: target - (len(experts) // groups)]
        padded[layer] = sorted(have | set(extra))
        added[layer] = sorted(extra)
    return padded, added


def describe_nonuniform(kept: dict[int, list[int]]) -> str:
    """One line for logs and reports: the per-layer count range and what the export does about it."""
    counts = {layer: len(v) for layer, v in sorted(kept.items())}
    if not counts:
        return "empty plan: no MoE layers."
    lo, hi = min(counts.values()), max(counts.values())
    if lo == hi:
        return f"uniform plan: {hi} experts kept in every one of {len(counts)} MoE layers; stock configs load it as is."
    extra = sum(hi - c for c in counts.values())
    return (
        f"non-uniform plan: {lo}..{hi} experts kept per layer ({', '.join(f'{k}:{c}' for k, c in counts.items())}); "
        f"stock transformers configs hold one routed-expert count, so the export is padded to {hi} per layer "
        f"({extra} dropped experts put back, the best-scoring ones)."
    )

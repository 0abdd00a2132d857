"""Merge plans from calibration statistics: `make_merge_plan(stats, method, ratio)` -> `MergePlan`.

Per MoE layer, n = E − drop experts remain (the same count as expert pruning at that ratio, split evenly over
router groups); `merge.grouping` forms n groups with the method's similarity, weights are usage counts |A_j|.

Budget `global` (MC-SMoE's adaptive per-layer counts): every (layer, expert) gets its normalised usage
u_{l,j} = |A_{l,j}| / Σ_j |A_{l,j}|; the L·n largest over all layers become dominants (at least top-k — and an
equal count per router group — per layer), so layers whose usage is concentrated keep fewer experts. A stock config
holds one expert count, so the per-layer counts are lifted to their maximum before export (the extra dominants are
each layer's next most used experts): `plan.note` says so and lists the adaptive counts.
"""

from __future__ import annotations

from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.merge.grouping import GROUPINGS, group_layer
from moeprune.merge.plan import ROUTER_STRATEGIES, MergePlan
from moeprune.models.routing import RoutingSpec
from moeprune.select.build import model_view
from moeprune.select.uniform import drop_count
from moeprune.stats.routed import RoutedStats
from moeprune.stats.store import ExpertStats, StatsView

BUDGETS = ("uniform", "global")


def router_partition(num_experts: int, routing: RoutingSpec) -> list[list[int]]:
    """Experts by router group (contiguous, DeepSeek-V3 n_group); one part for other routers."""
    groups = routing.n_group if routing.group_limited else 1
    size = num_experts // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]


def adaptive_counts(layers: dict[int, RoutedStats], total: int, floor: int, step: int) -> dict[int, int]:
    """Per-layer counts (multiples of `step`, >= floor) from the global ranking of normalised usage."""
    ranked = sorted(((float(st.sums["count"][j] / st.sums["count"].sum().clamp_min(1)), layer, j)
                     for layer, st in layers.items() for j in range(st.num_experts)), key=lambda x: (-x[0], x[1], x[2]))
    counts = dict.fromkeys(layers, 0)
    for _, layer, _j in ranked[:total]:
        counts[layer] += 1
    return {layer: max(floor, -(-c // step) * step) for layer, c in counts.items()}


def _usage(stats: RoutedStats, group: list[int]) -> list[float]:
    """Merge weights of a group: usage counts |A_j| (equal weights for a group nobody routed to)."""
    w = [float(stats.sums["count"][j]) for j in group]
    return w if sum(w) > 0 else [1.0] * len(group)


def make_merge_plan(source: str | Path | ExpertStats, method: str, ratio: float, *,
                    calib_set: list[str] | None = None, budget: str = "uniform", merge: str | None = None,
                    router: str = "dominant", rank: int | None = None, threshold: float = 0.4) -> MergePlan:
    """Group every MoE layer's experts with `method` (msmoe, hcsmoe, submoe, dern) from the statistics."""
    grouping = GROUPINGS.get(method)
    ROUTER_STRATEGIES.get(router)
    if budget not in BUDGETS:
        raise MoePruneError(f"--budget {budget!r}: choose one of {', '.join(BUDGETS)}.")
    view = model_view(source)
    if not isinstance(view, StatsView):
        raise MoePruneError(f"merge method {method!r} groups experts by calibration statistics: run `moeprune "
                            "calibrate MODEL --calib NAME=PATH --out stats.safetensors` and plan from that file, or "
                            "use `moeprune prune --calib ...`.")
    routing, E = view.routing(), view.num_experts
    n = E - drop_count(ratio, E, routing)  # validates the ratio before any work
    combined = view.stats.combined(calib_set)
    partition = router_partition(E, routing)
    counts = {layer: n for layer in view.moe_layers()}
    note = None
    if budget == "global":
        floor = max(routing.top_k, len(partition) * routing.min_experts_per_group() if len(partition) > 1 else 1)
        adaptive = adaptive_counts({layer: combined[layer] for layer in counts}, n * len(counts), floor,
                                   len(partition))
        top = max(adaptive.values())
        note = (f"adaptive per-layer counts {dict(sorted(adaptive.items()))} (global usage ranking) lifted to one "
                f"count, {top}, for stock configs: {sum(top - c for c in adaptive.values())} experts kept beyond "
                f"the adaptive plan")
        logger.warning("%s", note)
        counts = dict.fromkeys(counts, top)
    groups = {layer: group_layer(method, combined[layer], counts[layer], partition) for layer in counts}
    weights = {layer: [_usage(combined[layer], g) for g in gs] for layer, gs in groups.items()}
    plan = MergePlan(groups, E, weights, method=method, ratio=ratio, model_type=view.model_type,
                     merge=merge or grouping.merge, router=router, rank=rank, threshold=threshold, note=note)
    plan.validate(view)
    return plan

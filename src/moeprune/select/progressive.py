"""Prune-as-you-go deciders for `calibration.session.collect(decide=...)`: layer i's experts are chosen from what
layer i saw, and removed (masked in the model's own router) before layer i+1 is calibrated, so every later layer
is scored on the inputs the pruned model will really give it.

- `criterion_decider`: any calibrated criterion on layer i's statistics (all sets combined), uniform policy.
- `reconstruction_decider`: NAEE — the dropped set D minimising Σ‖Z − MoE_{E∖D}(X)‖_F² over layer i's cached
  MoE-block inputs X / outputs Z (non-padding tokens and padding alike), exhaustive when small, greedy beyond;
  progressive as in NAEE's layer-wise variant, since X of layer i+1 comes from the already-pruned layer i.
"""

from __future__ import annotations

from moeprune.criteria.base import Criterion
from moeprune.models.routing import RoutingSpec
from moeprune.select.policies import select
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.select.uniform import drop_count
from moeprune.stats.routed import RoutedStats


def _combined(stats: dict[str, RoutedStats]) -> RoutedStats:
    parts = list(stats.values())
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


def criterion_decider(crit: Criterion, ratio: float, routing: RoutingSpec, num_experts: int,
                      protected: dict[int, set[int]] | None = None):
    drop_count(ratio, num_experts, routing)  # validated before any calibration work

    def decide(model, adapter, layer, stats, io) -> list[int]:
        scores = {layer: crit.fn(_combined(stats))}
        prot = {layer: (protected or {}).get(layer, set())}
        kept = select("uniform", scores, ratio, routing, higher_keeps=crit.higher_keeps, protected=prot)[layer]
        return [j for j in range(num_experts) if j not in set(kept)]

    return decide


def reconstruction_decider(ratio: float, routing: RoutingSpec, num_experts: int,
                           protected: dict[int, set[int]] | None = None, max_exhaustive: int = 5000):
    n_drop = drop_count(ratio, num_experts, routing)
    groups = routing.n_group if routing.group_limited else 1

    def decide(model, adapter, layer, stats, io) -> list[int]:
        evaluate = block_evaluator(model, adapter, layer, io.inputs, io.outputs)
        result = search(evaluate, num_experts, n_drop, groups=groups,
                        protected=frozenset((protected or {}).get(layer, set())), max_exhaustive=max_exhaustive,
                        desc=f"NAEE search (layer {layer})")
        return list(result.dropped)

    return decide

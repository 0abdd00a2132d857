"""Prune-as-you-go deciders for `calibration.session.collect(decide=...)`: layer i's experts are chosen from what
layer i saw, and removed (masked in the model's own router) before layer i+1 is calibrated, so every later layer
is scored on the inputs the pruned model will really give it.

- `criterion_decider`: any calibrated criterion on layer i's statistics (all sets combined), uniform policy.
- `reconstruction_decider`: NAEE — the dropped set D minimising Σ_t ‖Z_t − MoE_{E∖D}(X_t)‖² over the real
  (non-padding) tokens of layer i's cached MoE-block inputs X / outputs Z, exhaustive when small, beam search
  beyond (`select/reconstruction.py`); each evaluation reuses every expert's output computed once per layer
  (`select/naee_outputs.py`) and runs only the router. Progressive as in NAEE's layer-wise variant, since X of
  layer i+1 comes from the already-pruned layer i.
"""

from __future__ import annotations

from moeprune.criteria.base import Criterion
from moeprune.errors import MoePruneError
from moeprune.io.memory import reuse_freed_memory
from moeprune.models.routing import RoutingSpec
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import DEFAULT_MAX_BYTES, DEFAULT_SEARCH_TOKENS, expert_outputs, keep_stride
from moeprune.select.policies import select
from moeprune.select.reconstruction import DEFAULT_BEAM, search
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
                           protected: dict[int, set[int]] | None = None, max_exhaustive: int = 5000,
                           beam: int = DEFAULT_BEAM, max_tokens: int | None = DEFAULT_SEARCH_TOKENS,
                           max_bytes: int = DEFAULT_MAX_BYTES):
    """NAEE decider; `beam`, `max_tokens` (None: every token), `max_bytes`: see `select/reconstruction.py` and
    `naee_outputs.py`."""
    n_drop = drop_count(ratio, num_experts, routing)
    groups = routing.n_group if routing.group_limited else 1
    prot = {layer: frozenset(v) for layer, v in (protected or {}).items()}
    for name, v in (("beam", beam), ("max_tokens", 1 if max_tokens is None else max_tokens), ("max_bytes", max_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:  # refused before any calibration work
            raise MoePruneError(f"NAEE: {name} must be a positive integer, got {v!r}.")

    def decide(model, adapter, layer, stats, io) -> list[int]:
        with reuse_freed_memory():  # the expert calls and batched router calls reallocate the same temporaries
            known = io.routed if len(io.routed) == len(io.inputs) else None  # one experts call per batch recorded
            outputs = expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid, max_tokens=max_tokens,
                                     max_bytes=max_bytes, max_dropped=n_drop, known=known,
                                     known_stride=io.routed_stride)
            evaluate = incremental_evaluator(model, adapter, layer, outputs)
            result = search(evaluate, num_experts, n_drop, groups=groups, protected=prot.get(layer, frozenset()),
                            max_exhaustive=max_exhaustive, beam=beam, desc=f"NAEE search (layer {layer})")
        return list(result.dropped)

    # the calibration pass keeps the routed outputs of the tokens the precompute will keep (`max_tokens`; a
    # `max_bytes` cap that keeps fewer makes the precompute compute them instead)
    decide.routed_stride = lambda real_tokens: keep_stride(real_tokens, max_tokens or real_tokens)[0]
    return decide

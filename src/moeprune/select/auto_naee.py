"""NAEE as a candidate of `method: auto` (`select/auto.py`): whether its search is affordable, and its plan.

NAEE is affordable (`auto_naee` None) when its search's estimated router-row evaluations stay within
`NAEE_BUDGET`: Σ_ℓ rows per token × tokens kept, rows per token = the evaluations Π_g C(E/g, n_drop/g) when that is
≤ the exhaustive limit, else (beam + 1)·n_drop·E scored whole (`select/reconstruction.py`), or (beam + 1)·n_drop·
(1 + k) where the routing is local and each beam parent's children are scored from its route
(`select/naee_incremental.py`), (1 + k + 2·topk_group) under a group limit scored by top-2 sums (`naee_reach.py`);
≈ 0.4–2 µs each on one CPU thread (E = 16 … 128), so the budget is ≈ 1.5–7 min of search. `auto_naee: true`
always includes it, `false` never.
The plan comes from NAEE's own progressive calibration pass over the scoring windows (`select/progressive.py`);
auto runs one search per fold and one on every window (`passes`).
"""

from __future__ import annotations

import dataclasses
import math

from moeprune.errors import UnsupportedLayout
from moeprune.models.base import MoEAdapter
from moeprune.select.naee_outputs import DEFAULT_SEARCH_TOKENS
from moeprune.select.plan import PrunePlan
from moeprune.select.progressive import reconstruction_decider
from moeprune.select.reconstruction import DEFAULT_BEAM
from moeprune.select.uniform import drop_count

NAEE_NAME = "naee_reconstruction"
NAEE_BUDGET = 2 * 10**8  # router-row evaluations of NAEE's search (module docstring)
MAX_EXHAUSTIVE = 5000  # `progressive.reconstruction_decider`'s exhaustive limit


def naee_decision(choice: bool | None, adapter: MoEAdapter, ratio: float, tokens: int, beam: int | None,
                  search_tokens: int | None, passes: int = 1) -> dict:
    """{"included": bool, "reason": str, "evaluations_per_layer", "tokens", "cost", "budget"} (module docstring);
    `passes`: how many searches auto runs (one per fold)."""
    from moeprune.models.capabilities import require

    routing, E = adapter.routing(), adapter.num_experts
    n_drop = drop_count(ratio, E, routing)
    groups = routing.n_group if routing.group_limited else 1
    subsets = math.comb(E // groups, n_drop // groups) ** groups
    b = DEFAULT_BEAM if beam is None else beam
    evaluations = subsets if subsets <= MAX_EXHAUSTIVE else (b + 1) * n_drop * E
    incremental = subsets > MAX_EXHAUSTIVE and (routing.local_masking or routing.group_reach)
    reached = routing.top_k + (0 if routing.local_masking else 2 * routing.topk_group)  # `naee_reach`: ≤ per token
    rows = (b + 1) * n_drop * (1 + reached) if incremental else evaluations  # router rows per token
    cap = DEFAULT_SEARCH_TOKENS if search_tokens is None else search_tokens
    kept = tokens if cap == 0 else min(tokens, cap)
    cost = rows * kept * len(adapter.moe_layers()) * passes
    out = {"evaluations_per_layer": evaluations, "exhaustive": subsets <= MAX_EXHAUSTIVE, "incremental": incremental,
           "tokens": kept, "passes": passes, "cost": cost, "budget": NAEE_BUDGET}
    if choice is False:
        return {"included": False, "reason": "auto_naee: false", **out}
    try:
        require(adapter, "naee")
    except UnsupportedLayout as e:
        if choice:
            raise
        return {"included": False, "reason": str(e), **out}
    if choice is None and cost > NAEE_BUDGET:
        return {"included": False, "reason": f"not affordable: its search needs ≈{cost:.2g} router-row evaluations "
                f"({rows} rows × {kept} tokens × {len(adapter.moe_layers())} layers × {passes} folds) > budget "
                f"{NAEE_BUDGET:.0e}; auto_naee: true includes it anyway", **out}
    return {"included": True, "reason": "auto_naee: true" if choice else f"affordable (≈{cost:.2g} router-row "
            f"evaluations ≤ {NAEE_BUDGET:.0e})", **out}


def naee_plan(ctx, scoring, adapter: MoEAdapter, ratio: float, protected: dict[int, set[int]], beam: int | None,
              search_tokens: int | None) -> PrunePlan:
    """NAEE's progressive search over the scoring windows (its own calibration pass; its statistics are not kept)."""
    extra = {} if beam is None else {"beam": beam}
    if search_tokens is not None:
        extra["max_tokens"] = search_tokens or None
    E = adapter.num_experts
    decide = reconstruction_decider(ratio, adapter.routing(), E, protected, **extra)
    stats = dataclasses.replace(ctx, sets=scoring, stats=[]).routed_stats(decide=decide)
    dropped = {int(k): set(v) for k, v in stats.meta["dropped_as_you_go"].items()}
    kept = {layer: [j for j in range(E) if j not in dropped.get(layer, set())] for layer in adapter.moe_layers()}
    return PrunePlan(kept, E, method=NAEE_NAME, ratio=ratio, model_type=adapter.model_type, policy="reconstruction")

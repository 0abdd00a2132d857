"""Selection policies: per-layer scores [E] -> kept experts per layer (ascending original indices).

Every policy has the signature

    policy(scores: {layer: Tensor[E]}, ratio, routing, *, higher_keeps=True, protected=None, floor=None)
        -> {layer: [kept expert indices, ascending]}

- ``uniform``:   the same drop in every layer, n_drop = round(ratio·E) (group-limited routers: the same drop in
                 every group, see `uniform.drop_count`). What stock configs can express.
- ``per_group``: ``uniform`` for group-limited routers only (DeepSeek-V3 / GLM-4.5 ``n_group``/``topk_group``);
                 refuses other routers so a user who asked for group equality gets it or an error.
- ``global``:    one ranking over all layers, non-uniform result (see `policy_global`).

Within a layer (or group) experts are dropped in the order (keep-score ascending, index descending), so ties
drop the higher index, as in `select_uniform`. ``protected[layer]`` experts are never dropped; ``floor`` is the
fewest experts any layer may keep. Every input is validated before any work; errors say what to change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.routing import RoutingSpec
from moeprune.registry import Registry
from moeprune.select.uniform import drop_count

Policy = Callable[..., dict[int, list[int]]]
POLICIES: Registry[Policy] = Registry("selection policy", hint="Use --policy uniform (the default) if unsure.")


def select(name: str, scores: dict[int, torch.Tensor], ratio: float, routing: RoutingSpec, **kwargs) -> dict:
    """Run the policy registered as `name` (did-you-mean error for unknown names)."""
    return POLICIES.get(name)(scores, ratio, routing, **kwargs)


def normalise_scores(s: torch.Tensor) -> torch.Tensor:
    """ŝ = s / mean_j |s_j| (float64, [E]); an all-zero layer stays zero. See `policy_global` for why."""
    scale = s.double().abs().mean()
    return s.double() / (scale if scale > 0 else 1.0)  # [E]


def _validate(scores, ratio, routing, protected, floor) -> tuple[int, int, dict[int, set[int]]]:
    """Check everything up front; return (E, groups, protected with every layer present)."""
    if not isinstance(scores, dict) or not scores:
        raise MoePruneError("no per-layer scores to select from; score the MoE layers first.")
    sizes = {layer: tuple(s.shape) for layer, s in scores.items()}
    if any(len(shape) != 1 for shape in sizes.values()) or len(set(sizes.values())) != 1:
        raise MoePruneError(f"scores must be one vector [E] per layer with the same E everywhere, got {sizes}.")
    E = next(iter(sizes.values()))[0]
    bad = [layer for layer, s in sorted(scores.items()) if not torch.isfinite(s.double()).all()]
    if bad:
        raise MoePruneError(f"scores of layers {bad} contain NaN or inf; check the statistics those layers saw.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise MoePruneError(f"--ratio must be a fraction strictly between 0 and 1 (e.g. 0.25), got {ratio!r}.")
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int) or not 1 <= floor <= E):
        raise MoePruneError(f"--floor must be an expert count between 1 and {E}, got {floor!r}.")
    groups = routing.n_group if routing.group_limited else 1
    if E % groups:
        raise MoePruneError(f"{E} experts do not split into the router's {groups} equal groups; check the config.")
    protected = {int(k): set(v) for k, v in (protected or {}).items()}
    unknown = sorted(set(protected) - set(scores))
    if unknown:
        raise MoePruneError(f"--protect names layers {unknown} that have no scores (MoE layers: {sorted(scores)}).")
    for layer, experts in sorted(protected.items()):
        out = sorted(j for j in experts if not (isinstance(j, int) and 0 <= j < E))
        if out:
            raise MoePruneError(f"--protect {layer}:{out[0]}: expert indices {out} are outside 0..{E - 1}.")
    return E, groups, {layer: protected.get(layer, set()) for layer in scores}


def _drop_order(keep: torch.Tensor, idx: range, protected: set[int]) -> list[int]:
    """Droppable experts of `idx`, first to drop first: (keep-score ascending, index descending)."""
    return sorted((j for j in idx if j not in protected), key=lambda j: (float(keep[j]), -j))


def policy_uniform(scores, ratio, routing, *, higher_keeps=True, protected=None, floor=None):
    """Drop round(ratio·E) experts in every layer (n_group·round(ratio·E/n_group) for group-limited routers,
    the same number in every group): the lowest keep-scores among the unprotected experts."""
    E, groups, protected = _validate(scores, ratio, routing, protected, floor)
    n_drop = drop_count(ratio, E, routing)
    if floor is not None and E - n_drop < floor:
        raise MoePruneError(
            f"--ratio {ratio} keeps {E - n_drop} experts per layer, below --floor {floor}; lower the ratio or the "
            "floor."
        )
    size, per_group = E // groups, n_drop // groups
    kept: dict[int, list[int]] = {}
    for layer, s in sorted(scores.items()):
        keep = s.double() if higher_keeps else -s.double()  # [E]
        dropped: list[int] = []
        for g in range(groups):
            order = _drop_order(keep, range(g * size, (g + 1) * size), protected[layer])
            if len(order) < per_group:
                where = f" group {g} (experts {g * size}..{(g + 1) * size - 1})" if groups > 1 else ""
                raise MoePruneError(
                    f"layer {layer}{where}: --ratio {ratio} drops {per_group} experts there but only {len(order)} "
                    f"are not protected ({sorted(protected[layer])}); lower the ratio or protect fewer experts."
                )
            dropped += order[:per_group]
        kept[layer] = sorted(set(range(E)) - set(dropped))
    return kept


def policy_per_group(scores, ratio, routing, *, higher_keeps=True, protected=None, floor=None):
    """The same drop in every router group of every layer; only for group-limited routers (n_group > 1)."""
    if not routing.group_limited:
        raise MoePruneError(
            f"the per_group policy needs a group-limited router (n_group > 1, DeepSeek-V3 / GLM-4.5 style); this "
            f"model routes {routing.describe()}. Use --policy uniform."
        )
    return policy_uniform(scores, ratio, routing, higher_keeps=higher_keeps, protected=protected, floor=floor)


def policy_global(scores, ratio, routing, *, higher_keeps=True, protected=None, floor=None):
    """Rank the experts of all L layers together and drop the N globally lowest, with a floor per layer.

        ŝ_{l,j} = s_{l,j} / mean_i |s_{l,i}|           (keep-score ±ŝ: sign flipped when higher = prune)
        N = g · round(ratio · E · L / g)                (g = n_group for group-limited routers, else 1)
        keep_l ≥ max(floor, top_k, g · min_experts_per_group)   and protected experts are never dropped

    Why divide by the layer's mean |s|: raw scores are not comparable across layers (e.g. output norms grow
    with depth), so each layer's scale is removed while its *contrast* is kept — a layer whose importance
    sits in a few experts has many experts far below its mean and loses more of them. Rank-normalising would
    give every layer the same set of values, hence the same drop count: uniform again.

    Group-limited routers drop in "rounds" of g experts, the i-th lowest of each group of a layer, costing the
    sum of their ŝ; per-group counts stay equal. Round costs never decrease within a layer, so taking the N/g
    cheapest rounds overall (ties: lower layer first) drops a prefix in every layer and minimises the total
    dropped ŝ under the per-layer limits (greedy is exact for these nested count constraints).
    """
    E, groups, protected = _validate(scores, ratio, routing, protected, floor)
    size, L = E // groups, len(scores)
    group_min = groups * routing.min_experts_per_group() if groups > 1 else 1
    min_keep = max(floor or 1, routing.top_k, group_min)
    total = groups * round(ratio * E * L / groups)
    if total == 0:
        raise MoePruneError(f"--ratio {ratio} drops 0 of {E * L} experts; use at least {groups / (E * L):.3g}.")
    orders: dict[int, list[list[int]]] = {}
    rounds: list[tuple[float, int, int]] = []  # (cost, layer, round)
    caps: dict[int, int] = {}
    for layer, s in sorted(scores.items()):
        keep = normalise_scores(s) if higher_keeps else -normalise_scores(s)  # [E]
        orders[layer] = [_drop_order(keep, range(g * size, (g + 1) * size), protected[layer]) for g in range(groups)]
        caps[layer] = max(0, min((E - min_keep) // groups, *(len(o) for o in orders[layer])))
        rounds += [(sum(float(keep[o[i]]) for o in orders[layer]), layer, i) for i in range(caps[layer])]
    if len(rounds) * groups < total:
        most = len(rounds) * groups
        limited = {layer: sorted(p) for layer, p in sorted(protected.items()) if p}
        raise MoePruneError(
            f"global policy: --ratio {ratio} drops {total} of {E * L} experts but at most {most} can go (every layer "
            f"keeps >= {min_keep} = max(floor, top-{routing.top_k}, group minimum {group_min}); max drops per layer "
            f"{caps}; protected {limited or 'none'}). Use --ratio <= {most / (E * L):.3g}, lower --floor, or protect "
            "fewer experts."
        )
    rounds.sort()
    depth = {layer: 0 for layer in scores}
    for _, layer, _ in rounds[: total // groups]:
        depth[layer] += 1
    kept = {}
    for layer in sorted(scores):
        dropped = {o[i] for o in orders[layer] for i in range(depth[layer])}
        kept[layer] = sorted(set(range(E)) - dropped)
    counts = [len(v) for v in kept.values()]
    logger.debug("global policy: %d experts dropped, kept per layer %d..%d", total, min(counts), max(counts))
    return kept


POLICIES.register("uniform", policy_uniform)
POLICIES.register("per_group", policy_per_group)
POLICIES.register("global", policy_global)

"""Neuron budgets: per-(expert, neuron) scores -> the neurons each expert keeps.

    expert:  every expert keeps its top n = round((1 − ratio) · I) neurons, n a multiple of `align`   (uniform width)
    layer:   each MoE layer keeps its top round((1 − ratio) · E · I) neurons across its experts
    global:  all MoE layers together keep the top round((1 − ratio) · L · E · I) neurons   (HEAPr's default)

With `layer` and `global`, every expert first keeps its own top `min_width` neurons (never emptied), then the
rest of the budget goes to the best remaining scores. All neurons of an expert cost the same parameters
(3 · H, or 3 · H + 2 for biased gpt-oss experts), so `ratio` is the fraction of routed-expert parameters removed.
Kept indices are ascending original neuron indices.

A budget is never changed silently: `check_budget` refuses, before any calibration, every (ratio, min_width,
align) the selection cannot honour — with `expert`, a ratio whose aligned width removes more than half an
alignment step (align / 2I) more or less than asked, or one that `min_width` overrides; with `layer`/`global`, a
ratio that keeps fewer neurons than `min_width` per expert needs; with any budget, a ratio that removes nothing.
"""

from __future__ import annotations

from numbers import Integral, Real

import torch

from moeprune.errors import MoePruneError
from moeprune.registry import Registry

BUDGETS: Registry[str] = Registry("neuron budget", "Budgets: expert (uniform width), layer, global.")
for _name in ("expert", "layer", "global"):
    BUDGETS.register(_name, _name)

_EPS = 1e-9  # float slack when comparing removed fractions


def check_budget(ratio: float, budget: str, min_width: int, width: int, *, align: int = 1,
                 num_experts: int | None = None, num_layers: int | None = None) -> None:
    """Refuse, before any work, a neuron budget that `select_neurons` could not honour exactly.

    width = I (neurons per expert); align: kept widths under `expert` are multiples of it (8 for transformers'
    grouped_mm kernel); num_experts = E and num_layers = L (MoE layers) enable the `layer`/`global` checks."""
    BUDGETS.get(budget)
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0.0 < ratio < 1.0:
        raise MoePruneError(f"--ratio {ratio}: the fraction of routed-expert parameters to remove must lie in (0, 1).")
    if isinstance(min_width, bool) or not isinstance(min_width, Integral) or not 1 <= min_width <= width:
        raise MoePruneError(f"--min-width {min_width} must lie in [1, expert width {width}].")
    if isinstance(align, bool) or not isinstance(align, Integral) or align < 1:
        raise MoePruneError(f"neuron alignment {align!r} must be a positive integer (8 for grouped_mm).")
    if budget == "expert":
        _check_expert_width(ratio, width, min_width, align)
        return
    if num_experts is None or (budget == "global" and num_layers is None):
        return
    G = 1 if budget == "layer" else num_layers
    scope = "each MoE layer" if budget == "layer" else f"the {G} MoE layers together"
    everything = G * num_experts * width  # neurons in the budget's scope
    total, need = round((1 - ratio) * everything), G * num_experts * min_width
    if total < need:
        raise MoePruneError(_min_width_refusal(ratio, min_width, total, need, G * num_experts, everything, scope))
    if total >= everything:
        raise MoePruneError(f"--ratio {ratio} keeps all {everything} neurons of {scope} (round((1 − ratio) · "
                            f"{everything}) = {total}): nothing would be removed; raise --ratio to at least "
                            f"{_fmt(1 / everything)}.")


def _min_width_refusal(ratio: float, min_width: int, total: int, need: int, experts: int, everything: int,
                      scope: str) -> str:
    """The message for a layer/global budget whose kept total is below `min_width` neurons per expert."""
    max_ratio = _fmt(1 - need / everything)
    msg = (f"--ratio {ratio} keeps {total} neurons in {scope} but --min-width {min_width} alone needs {need} "
           f"({experts} experts × {min_width})")
    if min_width > 1:
        fits = total // experts
        lower = f"lower --min-width to at most {fits} or " if fits >= 1 else ""
        return f"{msg}; {lower}lower --ratio to at most {max_ratio}."
    return f"{msg}: every expert keeps at least one neuron; lower --ratio to at most {max_ratio}."


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _check_expert_width(ratio: float, width: int, min_width: int, align: int) -> None:
    """Refuse an `expert` budget whose kept width n (`expert_width_kept`: a multiple of align, ≥ max(min_width,
    align), ≤ I) removes nothing or a fraction 1 − n/I more than half an alignment step, align / (2I), from ratio."""
    I = width
    target = (1 - ratio) * I  # neurons the ratio keeps, before rounding
    if round(target) < 1:
        raise MoePruneError(f"--ratio {ratio} leaves no neuron of {I} per expert; lower it.")
    floor = _aligned_floor(min_width, align)  # narrowest allowed width
    why = f"kept widths must be multiples of {align} (transformers' grouped_mm experts kernel needs them)"
    widths = list(range(floor, I, align))  # every kept width that is allowed and removes something
    if not widths:
        raise MoePruneError(f"--budget expert cannot narrow experts of width {I}: no kept width ≥ {floor}"
                            f"{f' (--min-width {min_width})' if floor > align else ''} lies below {I}"
                            f"{f'; {why}' if align > 1 else ''}."
                            f"{' Lower --min-width.' if floor > align and align < I else ''}")
    n = expert_width_kept(ratio, I, min_width, align)
    removed, half_step = 1 - n / I, align / (2 * I)
    if n < I and abs(removed - ratio) <= half_step + _EPS:
        return
    near = sorted(sorted(widths, key=lambda w: (abs(w - target), w))[:2], reverse=True)  # two nearest widths
    achievable = "Achievable ratios nearby: " + " or ".join(f"{_fmt(1 - w / I)} (keeps {w} of {I})" for w in near) + "."
    if n >= I:
        raise MoePruneError(f"--ratio {ratio} would keep {_fmt(target)} of {I} neurons per expert, which rounds to "
                            f"all {I}{f' ({why})' if align > 1 else ''}: nothing would be removed. {achievable}")
    by_ratio = min(max(round(target / align) * align, align), I)  # what min_width 1 would keep
    if n > by_ratio:  # min_width, not the ratio, sets the width
        rounded = f" (rounded up to a multiple of {align})" if n != min_width else ""
        honoured = by_ratio < I and abs(1 - by_ratio / I - ratio) <= half_step + _EPS  # with a lower min_width
        fix = f"Lower --min-width to at most {by_ratio}, or choose" if honoured else "Choose"
        raise MoePruneError(f"--min-width {min_width} forces {n} neurons per expert{rounded} but --ratio {ratio} "
                            f"keeps {round(target)} of {I}: experts would lose {_fmt(removed)} of their neurons, "
                            f"not {ratio}. {fix} a ratio the widths allow. {achievable}")
    raise MoePruneError(f"--ratio {ratio} cannot be honoured on expert width {I}: {why}, so experts would keep "
                        f"{n} of {I} neurons and lose {_fmt(removed)}, more than half an alignment step "
                        f"({_fmt(half_step)}) away from {ratio}. {achievable}")


def _aligned_floor(min_width: int, align: int) -> int:
    """The narrowest kept width allowed: min_width rounded up to a multiple of align, at least align."""
    return max(-(-min_width // align) * align, align)


def _top_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """scores [..., I] -> bool mask [..., I] of the n highest per row (ties: lower index first)."""
    order = torch.argsort(-scores.double(), dim=-1, stable=True)[..., :n]
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, order, True)


def _kept(mask: torch.Tensor) -> dict[int, list[int]]:
    """bool [E, I] -> {expert: ascending kept indices}."""
    return {j: torch.nonzero(mask[j]).flatten().tolist() for j in range(mask.shape[0])}


def expert_width_kept(ratio: float, width: int, min_width: int = 1, align: int = 1) -> int:
    """Kept neurons per expert under the `expert` budget: round((1 − ratio) · I) to a multiple of `align`
    (transformers' grouped_mm kernel needs widths % 8 == 0 in half precision), at least min_width rounded up to a
    multiple of align, at most I. `check_budget` refuses the ratios where this differs from the ratio's width."""
    n = round((1 - ratio) * width / align) * align
    return min(width, max(n, _aligned_floor(min_width, align)))


def select_neurons(scores: dict[int, torch.Tensor], ratio: float, budget: str = "global",
                   min_width: int = 1, align: int = 1) -> dict[int, dict[int, list[int]]]:
    """scores: {layer: [E, I]} (higher = keep) -> {layer: {expert: kept neuron indices}}."""
    if not scores:
        raise MoePruneError("no MoE layer scores to select from.")
    E, I = next(iter(scores.values())).shape
    check_budget(ratio, budget, min_width, I, align=align, num_experts=E, num_layers=len(scores))
    if budget == "expert":
        n = expert_width_kept(ratio, I, min_width, align)
        return {layer: _kept(_top_mask(s, n)) for layer, s in scores.items()}
    groups = [[layer] for layer in scores] if budget == "layer" else [list(scores)]
    kept: dict[int, dict[int, list[int]]] = {}
    for group in groups:
        flat = torch.stack([scores[layer].double().cpu() for layer in group])  # [G, E, I]
        total = round((1 - ratio) * flat.numel())
        mask = _top_mask(flat, min_width)  # [G, E, I] every expert's own best min_width
        if total < int(mask.sum()):  # check_budget refuses this first; kept as the invariant it protects
            scope = "each MoE layer" if budget == "layer" else f"the {len(group)} MoE layers together"
            raise MoePruneError(_min_width_refusal(ratio, min_width, total, int(mask.sum()), len(group) * E,
                                                  flat.numel(), scope))
        order = torch.argsort(-flat.reshape(-1), stable=True)  # best first
        free = order[~mask.reshape(-1)[order]]  # best first, not yet kept
        mask.view(-1)[free[: total - int(mask.sum())]] = True
        for g, layer in enumerate(group):
            kept[layer] = _kept(mask[g])
    return kept

"""Neuron budgets: per-(expert, neuron) scores -> the neurons each expert keeps.

    expert:  every expert keeps its top n = max(min_width, round((1 − ratio) · I)) neurons   (uniform width)
    layer:   each MoE layer keeps its top round((1 − ratio) · E · I) neurons across its experts
    global:  all MoE layers together keep the top round((1 − ratio) · L · E · I) neurons   (HEAPr's default)

With `layer` and `global`, every expert first keeps its own top `min_width` neurons (never emptied), then the
rest of the budget goes to the best remaining scores. All neurons of an expert cost the same parameters
(3 · H, or 3 · H + 2 for biased gpt-oss experts), so `ratio` is the fraction of routed-expert parameters removed.
Kept indices are ascending original neuron indices.
"""

from __future__ import annotations

import torch

from moeprune.errors import MoePruneError
from moeprune.registry import Registry

BUDGETS: Registry[str] = Registry("neuron budget", "Budgets: expert (uniform width), layer, global.")
for _name in ("expert", "layer", "global"):
    BUDGETS.register(_name, _name)


def check_budget(ratio: float, budget: str, min_width: int, width: int) -> None:
    BUDGETS.get(budget)
    if not 0.0 < ratio < 1.0:
        raise MoePruneError(f"--ratio {ratio}: the fraction of routed-expert parameters to remove must lie in (0, 1).")
    if not 1 <= min_width <= width:
        raise MoePruneError(f"--min-width {min_width} must lie in [1, expert width {width}].")
    if budget == "expert" and round((1 - ratio) * width) < 1:
        raise MoePruneError(f"--ratio {ratio} leaves no neuron of {width} per expert; lower it.")


def _top_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """scores [..., I] -> bool mask [..., I] of the n highest per row (ties: lower index first)."""
    order = torch.argsort(-scores.double(), dim=-1, stable=True)[..., :n]
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, order, True)


def _kept(mask: torch.Tensor) -> dict[int, list[int]]:
    """bool [E, I] -> {expert: ascending kept indices}."""
    return {j: torch.nonzero(mask[j]).flatten().tolist() for j in range(mask.shape[0])}


def expert_width_kept(ratio: float, width: int, min_width: int = 1, align: int = 1) -> int:
    """Kept neurons per expert under the `expert` budget: round((1 − ratio) · I) to a multiple of `align`
    (transformers' grouped_mm kernel needs widths % 8 == 0 in half precision), at least max(min_width, align)."""
    n = round((1 - ratio) * width / align) * align
    return min(width, max(n, min_width, align))


def select_neurons(scores: dict[int, torch.Tensor], ratio: float, budget: str = "global",
                   min_width: int = 1, align: int = 1) -> dict[int, dict[int, list[int]]]:
    """scores: {layer: [E, I]} (higher = keep) -> {layer: {expert: kept neuron indices}}."""
    if not scores:
        raise MoePruneError("no MoE layer scores to select from.")
    E, I = next(iter(scores.values())).shape
    check_budget(ratio, budget, min_width, I)
    if budget == "expert":
        n = expert_width_kept(ratio, I, min_width, align)
        return {layer: _kept(_top_mask(s, n)) for layer, s in scores.items()}
    groups = [[layer] for layer in scores] if budget == "layer" else [list(scores)]
    kept: dict[int, dict[int, list[int]]] = {}
    for group in groups:
        flat = torch.stack([scores[layer].double().cpu() for layer in group])  # [G, E, I]
        total = round((1 - ratio) * flat.numel())
        mask = _top_mask(flat, min_width)  # [G, E, I] every expert's own best min_width
        if total < int(mask.sum()):
            raise MoePruneError(f"--ratio {ratio} keeps {total} neurons but --min-width {min_width} alone needs "
                                f"{int(mask.sum())}; lower --min-width or --ratio.")
        order = torch.argsort(-flat.reshape(-1), stable=True)  # best first
        free = order[~mask.reshape(-1)[order]]  # best first, not yet kept
        mask.view(-1)[free[: total - int(mask.sum())]] = True
        for g, layer in enumerate(group):
            kept[layer] = _kept(mask[g])
    return kept

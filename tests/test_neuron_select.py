"""Neuron budgets against a brute-force reference (plain Python sorting over every (layer, expert, neuron))."""

from __future__ import annotations

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.select.neurons import select_neurons


def _scores(seed=0, layers=(1, 3), E=4, I=12):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.rand(E, I, generator=g) * (layer + 1) for layer in layers}  # layers on different scales


def _reference(scores, ratio, budget, min_width):
    E, I = next(iter(scores.values())).shape
    if budget == "expert":
        n = max(min_width, round((1 - ratio) * I))
        return {L: {j: sorted(sorted(range(I), key=lambda k: -float(s[j, k]))[:n]) for j in range(E)}
                for L, s in scores.items()}
    groups = [[L] for L in scores] if budget == "layer" else [list(scores)]
    out = {}
    for group in groups:
        items = [(float(scores[L][j, k]), L, j, k) for L in group for j in range(E) for k in range(I)]
        total = round((1 - ratio) * len(items))
        chosen = set()
        for L in group:
            for j in range(E):
                best = sorted(range(I), key=lambda k: -float(scores[L][j, k]))[:min_width]
                chosen |= {(L, j, k) for k in best}
        for _, L, j, k in sorted(items, reverse=True):
            if len(chosen) >= total:
                break
            chosen.add((L, j, k))
        for L in group:
            out[L] = {j: sorted(k for (l2, e, k) in chosen if l2 == L and e == j) for j in range(E)}
    return out


@pytest.mark.parametrize("budget", ["expert", "layer", "global"])
@pytest.mark.parametrize("ratio,min_width", [(0.25, 1), (0.5, 3), (0.75, 2)])
def test_budgets_match_brute_force(budget, ratio, min_width):
    scores = _scores(seed=int(ratio * 100) + min_width)
    got = select_neurons(scores, ratio, budget, min_width)
    assert got == _reference(scores, ratio, budget, min_width)
    kept = sum(len(v) for d in got.values() for v in d.values())
    if budget != "expert":
        assert kept == round((1 - ratio) * 2 * 4 * 12)
    assert all(len(v) >= min_width for d in got.values() for v in d.values())


def test_global_budget_follows_scale_and_layer_budget_does_not():
    scores = {1: torch.full((2, 8), 1.0) + torch.arange(8) * 1e-3, 2: torch.full((2, 8), 5.0) + torch.arange(8) * 1e-3}
    g = select_neurons(scores, 0.5, "global", min_width=1)
    assert [len(v) for v in g[1].values()] == [1, 1] and [len(v) for v in g[2].values()] == [7, 7]
    lay = select_neurons(scores, 0.5, "layer", min_width=1)
    assert [len(v) for v in lay[1].values()] == [4, 4]


def test_bad_budgets():
    scores = _scores()
    with pytest.raises(MoePruneError, match="unknown neuron budget 'glob'"):
        select_neurons(scores, 0.5, "glob")
    with pytest.raises(MoePruneError, match="must lie in \\(0, 1\\)"):
        select_neurons(scores, 1.0, "expert")
    with pytest.raises(MoePruneError, match="--min-width 13"):
        select_neurons(scores, 0.5, "global", min_width=13)
    with pytest.raises(MoePruneError, match="min-width 10 alone needs"):
        select_neurons(scores, 0.5, "global", min_width=10)

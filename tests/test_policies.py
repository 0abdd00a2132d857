"""Selection policies, protection and non-uniform padding against brute-force references written here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.models import get_adapter
from moeprune.models.routing import RoutingSpec
from moeprune.select.nonuniform import describe_nonuniform, pad_to_uniform
from moeprune.select.policies import POLICIES, select
from moeprune.select.protect import parse_protected, super_experts
from moeprune.select.uniform import select_uniform
from moeprune.tiny import tiny_config

SOFTMAX = RoutingSpec("softmax_topk", top_k=2)


@pytest.fixture(scope="module")
def grouped() -> RoutingSpec:
    """DeepSeek-V3 tiny routing: E=8 in 2 groups of 4, top-2 from 1 group (group minimum 2 per group)."""
    routing = get_adapter(tiny_config("deepseek_v3")).routing()
    assert routing.group_limited and routing.n_group == 2
    return routing


def rand_scores(layers, E, seed) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # layer-dependent scale and contrast, so raw global ranking and normalised ranking differ
    return {layer: torch.rand(E, generator=g).double() ** (1 + i) * 10 ** i for i, layer in enumerate(layers)}


def dropped_of(kept, E):
    return {layer: sorted(set(range(E)) - set(v)) for layer, v in kept.items()}


def group_counts(kept, groups, size):
    return [sum(1 for j in kept if j // size == g) for g in range(groups)]


def brute_force_global(scores, total, groups, min_keep, protected, higher_keeps=True):
    """Exhaustive over per-layer drop counts (multiples of `groups`); in a layer with d drops per group, the d
    lowest unprotected normalised keep-scores of each group go. Returns the minimal total dropped keep-score."""
    E = next(iter(scores.values())).numel()
    size = E // groups
    best = None
    per_layer = {}
    for layer, s in scores.items():
        norm = s / s.abs().mean()
        keep = norm if higher_keeps else -norm
        orders = [sorted(float(keep[j]) for j in range(g * size, (g + 1) * size) if j not in protected.get(layer, ()))
                  for g in range(groups)]
        cap = min((E - min_keep) // groups, *(len(o) for o in orders))
        per_layer[layer] = [sum(sum(o[:d]) for o in orders) for d in range(cap + 1)]
    for ds in itertools.product(*(range(len(c)) for c in per_layer.values())):
        if sum(ds) * groups == total:
            cost = sum(c[d] for c, d in zip(per_layer.values(), ds, strict=True))
            best = cost if best is None else min(best, cost)
    return best


def dropped_cost(scores, kept, higher_keeps=True):
    total = 0.0
    for layer, s in scores.items():
        norm = s / s.abs().mean()
        keep = norm if higher_keeps else -norm
        total += sum(float(keep[j]) for j in range(s.numel()) if j not in kept[layer])
    return total


@pytest.mark.parametrize("routing", [SOFTMAX, RoutingSpec("sigmoid_grouped", top_k=2, n_group=4, topk_group=2)])
def test_uniform_equals_select_uniform_and_honours_protection(routing):
    for seed in range(5):
        scores = rand_scores([1, 2, 3], 16, seed)
        assert select("uniform", scores, 0.25, routing) == select_uniform(scores, 0.25, routing)
        protect = {1: {int(scores[1].argmin())}, 3: {0, 5}}
        kept = select("uniform", scores, 0.25, routing, protected=protect, higher_keeps=False)
        groups, size = (routing.n_group, 4) if routing.group_limited else (1, 16)
        for layer, v in kept.items():
            assert protect.get(layer, set()) <= set(v) and len(v) == 12
            for g in range(groups):  # brute force: the highest unprotected scores of each group go
                cand = [j for j in range(g * size, (g + 1) * size) if j not in protect.get(layer, set())]
                want = sorted(cand, key=lambda j: -float(scores[layer][j]))[: 4 // groups]
                assert sorted(set(range(g * size, (g + 1) * size)) - set(v)) == sorted(want)


def test_per_group_equal_drop_on_deepseek_routing(grouped):
    scores = rand_scores([1, 2], 8, 3)
    kept = select("per_group", scores, 0.5, grouped, protected={2: {0}})
    for v in kept.values():
        assert group_counts(v, 2, 4) == [2, 2]
    assert 0 in kept[2]
    with pytest.raises(MoePruneError, match="uniform"):
        select("per_group", scores, 0.5, SOFTMAX)


def test_global_matches_brute_force_sort():
    """No limit binds: the N lowest normalised scores over all layers are dropped; the result is non-uniform."""
    scores = {1: torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 0.9]), 2: torch.tensor([9.0, 8, 7, 6, 0.1, 0.2, 0.3, 0.4]) * 100}
    kept = select("global", scores, 0.3, SOFTMAX)  # N = round(0.3 · 16) = 5
    flat = sorted((float(s[j] / s.abs().mean()), layer, j) for layer, s in scores.items() for j in range(8))
    want = {(layer, j) for _, layer, j in flat[:5]}
    assert {(layer, j) for layer, d in dropped_of(kept, 8).items() for j in d} == want
    assert [len(v) for v in kept.values()] == [7, 4]  # raw scores would drop 5 from layer 1


@pytest.mark.parametrize("higher_keeps", [True, False])
@pytest.mark.parametrize("floor", [None, 4])
def test_global_is_optimal_with_floor_and_protection(floor, higher_keeps):
    E, layers = 8, [0, 1, 2]
    for seed in range(6):
        scores = rand_scores(layers, E, seed)
        protect = {0: {seed % E}, 2: {1, 2}}
        for ratio in (0.3, 0.45):
            kept = select("global", scores, ratio, SOFTMAX, floor=floor, protected=protect, higher_keeps=higher_keeps)
            min_keep = max(floor or 1, 2)
            assert all(len(v) >= min_keep for v in kept.values())
            if floor and ratio == 0.45:  # 11 of at most 12 drops: the floor binds
                assert min(len(v) for v in kept.values()) == floor
            assert all(protect.get(layer, set()) <= set(v) for layer, v in kept.items())
            assert sum(E - len(v) for v in kept.values()) == round(ratio * E * 3)
            want = brute_force_global(scores, round(ratio * E * 3), 1, min_keep, protect, higher_keeps)
            assert dropped_cost(scores, kept, higher_keeps) == pytest.approx(want, abs=1e-12)


def test_global_group_limited_keeps_groups_equal(grouped):
    counts = set()
    for seed in range(6):
        scores = rand_scores([1, 2, 3], 8, seed)
        kept = select("global", scores, 0.3, grouped, protected={3: {4}})
        total = 2 * round(0.3 * 8 * 3 / 2)
        assert sum(8 - len(v) for v in kept.values()) == total and 4 in kept[3]
        for v in kept.values():
            per = group_counts(v, 2, 4)
            assert per[0] == per[1] >= grouped.min_experts_per_group()
        counts.add(tuple(len(v) for v in kept.values()))
        want = brute_force_global(scores, total, 2, 4, {3: {4}})
        assert dropped_cost(scores, kept) == pytest.approx(want, abs=1e-12)
    assert any(len(set(c)) > 1 for c in counts)  # non-uniform at least once


def test_policy_errors_say_what_to_change(grouped):
    s = rand_scores([1, 2], 8, 0)
    with pytest.raises(MoePruneError, match="Did you mean 'global'"):
        select("globl", s, 0.25, SOFTMAX)
    with pytest.raises(MoePruneError, match="layer 1.*protect fewer"):
        select("uniform", s, 0.5, SOFTMAX, protected={1: {0, 1, 2, 3, 4}})
    with pytest.raises(MoePruneError, match="at most 7 can go.*--ratio <= 0.438"):
        select("global", s, 0.5, SOFTMAX, protected={1: set(range(7))}, floor=2)
    with pytest.raises(MoePruneError, match="below --floor"):
        select("uniform", s, 0.5, SOFTMAX, floor=6)
    cases = [({}, 0.25, {}, "no per-layer scores"), (s, 1.0, {}, "strictly between"),
             ({1: torch.ones(8), 2: torch.ones(6)}, 0.25, {}, "same E"),
             ({1: torch.tensor([1.0, float("nan")] * 4)}, 0.25, {}, "NaN"),
             (s, 0.25, {"protected": {7: {0}}}, "layers \\[7\\]"), (s, 0.25, {"protected": {1: {8}}}, "outside"),
             (s, 0.25, {"floor": 0}, "--floor"), (s, 0.25, {"floor": 9}, "--floor")]
    for name in POLICIES:
        routing = grouped if name == "per_group" else SOFTMAX
        for scores, ratio, kw, msg in cases:
            with pytest.raises(MoePruneError, match=msg):
                select(name, scores, ratio, routing, **kw)


def test_parse_protected():
    assert parse_protected(["3:5", "3:7,1", "0:2"]) == {3: {1, 5, 7}, 0: {2}}
    assert parse_protected([]) == {}
    for bad in ("3", "3:", ":5", "a:1", "3:1,x", "-1:2", "3:-2", "3:1,,2"):
        with pytest.raises(MoePruneError, match="LAYER:EXPERT"):
            parse_protected([bad])


def test_super_experts_against_numpy_percentile():
    rest = np.ones(256)
    for top, want in (([100, 8, 6], {(0, 0)}), ([100, 60, 50], {(0, 0), (0, 1)})):  # max/10 binds, then P99.5
        values = rest.copy()
        values[:3] = top
        m = {0: torch.tensor(values[:128]), 1: torch.tensor(values[128:])}
        tau = max(np.percentile(values, 99.5), values.max() / 10)
        by_hand = {(i // 128, i % 128) for i in np.nonzero(values > tau)[0]}
        got = {(layer, j) for layer, js in super_experts(m).items() for j in js}
        assert got == by_hand == want
    g = torch.Generator().manual_seed(0)
    m = {layer: torch.rand(64, generator=g) ** 4 * 50 for layer in range(4)}
    values = np.concatenate([m[layer].numpy() for layer in range(4)]).astype(np.float64)
    tau = max(np.percentile(values, 99.5), values.max() / 10)
    got = {(layer, j) for layer, js in super_experts(m).items() for j in js}
    assert got == {(i // 64, i % 64) for i in np.nonzero(values > tau)[0]} and got
    for bad in ({}, {0: torch.ones(2, 2)}, {0: torch.tensor([1.0, -1.0])}, {0: torch.tensor([float("nan")])}):
        with pytest.raises(MoePruneError):
            super_experts(bad)


def test_pad_to_uniform_adds_best_dropped(grouped):
    kept = {1: [0, 2, 3, 5, 6], 2: [1, 4, 7], 3: [0, 1, 2, 3, 4]}
    scores = {layer: [float(x) for x in torch.randperm(8, generator=torch.Generator().manual_seed(layer))]
              for layer in kept}
    for higher_keeps in (True, False):
        padded, added = pad_to_uniform(kept, scores, 8, higher_keeps, SOFTMAX)
        for layer, v in kept.items():
            assert set(v) <= set(padded[layer]) and len(padded[layer]) == 5 and padded[layer] == sorted(padded[layer])
            dropped = sorted(set(range(8)) - set(v), key=lambda j: scores[layer][j], reverse=higher_keeps)
            assert added[layer] == sorted(dropped[: 5 - len(v)]) == sorted(set(padded[layer]) - set(v))
    padded, added = pad_to_uniform(kept, None, 8, True, SOFTMAX)
    assert added == {1: [], 2: [0, 2], 3: []}
    g_kept = {1: [0, 1, 4, 5], 2: [0, 1, 2, 4, 5, 6]}
    padded, added = pad_to_uniform(g_kept, None, 8, True, grouped)
    assert padded[1] == [0, 1, 2, 4, 5, 6] and added == {1: [2, 6], 2: []}
    for bad_kept, bad_scores, msg in (({1: [0, 1, 2, 4]}, None, "per router group"), ({1: [0, 9]}, None, "unique"),
                                      ({1: [0, 1, 4, 5]}, {1: [1.0] * 7}, "8 values")):
        with pytest.raises(MoePruneError, match=msg):
            pad_to_uniform(bad_kept, bad_scores, 8, True, grouped)


def test_describe_nonuniform():
    line = describe_nonuniform({1: [0, 1, 2], 2: [0, 1, 2, 3, 4]})
    assert "3..5" in line and "one routed-expert count" in line and "padded to 5" in line and "\n" not in line
    assert "uniform plan: 3" in describe_nonuniform({1: [0, 1, 2], 2: [3, 4, 5]})

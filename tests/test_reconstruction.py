"""NAEE reconstruction search: the pure search against brute force, and the block evaluator on a real tiny
Qwen3-MoE block against a MoE forward written out by hand here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moeprune.errors import MoePruneError
from moeprune.models import get_adapter
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.tiny import tiny_model

LAYER = 1


@pytest.fixture(scope="module")
def qwen():
    """(model, adapter, X, Z): the layer-1 MoE block's inputs / outputs [2, 16, H] for 2 batches of random tokens."""
    model = tiny_model("qwen3_moe", seed=3)
    adapter = get_adapter(model.config)
    X, Z = [], []

    def capture(module, args, out) -> None:
        X.append(args[0].detach().clone())
        Z.append(out.detach().clone())

    handle = adapter.block(model, LAYER).register_forward_hook(capture)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=torch.randint(0, model.config.vocab_size, (2, 16), generator=g))
    handle.remove()
    assert len(X) == 2 and X[0].shape == Z[0].shape == (2, 16, model.config.hidden_size)
    return model, adapter, X, Z


@torch.no_grad()
def hand_moe(block, x: torch.Tensor, dropped: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE block by hand in float64: p = softmax(ℓ with -inf on D), top-2, renormalised, SwiGLU experts.
    Returns (output [N, H], selected experts [N, 2])."""
    h = x.reshape(-1, x.shape[-1]).double()  # [N, H]
    logits = h @ block.gate.weight.double().T  # [N, E]
    logits[:, list(dropped)] = float("-inf")
    w, idx = torch.topk(logits.softmax(-1), 2, dim=-1)  # [N, 2]
    w = w / w.sum(-1, keepdim=True)
    gu, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()  # (E, 2I, H), (E, H, I)
    out = torch.zeros_like(h)
    for slot in range(2):
        gate, up = torch.einsum("nh,nih->ni", h, gu[idx[:, slot]]).chunk(2, -1)  # [N, I] each
        y = torch.einsum("ni,nhi->nh", F.silu(gate) * up, down[idx[:, slot]])  # [N, H]
        out += w[:, slot, None] * y
    return out, idx


def hand_error(block, X, Z, dropped) -> float:
    return sum(float((z.reshape(-1, z.shape[-1]).double() - hand_moe(block, x, dropped)[0]).square().sum())
               for x, z in zip(X, Z, strict=True))


def test_block_evaluator_and_exhaustive_search_match_brute_force(qwen):
    model, adapter, X, Z = qwen
    block = adapter.block(model, LAYER)
    evaluate = block_evaluator(model, adapter, LAYER, X, Z)
    assert evaluate(()) == pytest.approx(0.0, abs=1e-8)
    errors = {D: hand_error(block, X, Z, D) for D in itertools.combinations(range(8), 2)}
    for D, want in errors.items():
        assert evaluate(D) == pytest.approx(want, rel=1e-4, abs=1e-7), D
    assert min(errors.values()) > 1e-3  # dropping experts really changes the output
    result = search(evaluate, 8, 2)
    assert result.exhaustive and result.evaluated == 28
    assert result.dropped == min(errors, key=errors.get)
    assert result.error == pytest.approx(min(errors.values()), rel=1e-4)


def test_greedy_beats_frequency_and_random_drops(qwen):
    model, adapter, X, Z = qwen
    block = adapter.block(model, LAYER)
    evaluate = block_evaluator(model, adapter, LAYER, X, Z)
    greedy = search(evaluate, 8, 4, max_exhaustive=0, beam=1)
    assert not greedy.exhaustive and greedy.evaluated == 8 + 7 + 6 + 5 and len(greedy.dropped) == 4
    singles = {j: hand_error(block, X, Z, (j,)) for j in range(8)}
    assert min(singles, key=singles.get) in greedy.dropped  # greedy's first step is the best single drop
    all_sets = {D: hand_error(block, X, Z, D) for D in itertools.combinations(range(8), 4)}
    assert greedy.error == pytest.approx(all_sets[greedy.dropped], rel=1e-4)
    assert greedy.error >= min(all_sets.values()) * (1 - 1e-4)
    freq = torch.bincount(torch.cat([hand_moe(block, x, ())[1].flatten() for x in X]), minlength=8)  # [E]
    by_freq = tuple(sorted(sorted(range(8), key=lambda j: (int(freq[j]), j))[:4]))
    assert freq.sum() == 2 * 64 and greedy.error <= all_sets[by_freq] * (1 + 1e-6)
    g = torch.Generator().manual_seed(0)
    random_sets = [tuple(sorted(torch.randperm(8, generator=g)[:4].tolist())) for _ in range(20)]
    assert greedy.error < sorted(all_sets[D] for D in random_sets)[10]  # better than the median random drop
    exact = search(evaluate, 8, 4)
    assert exact.exhaustive and exact.error == pytest.approx(min(all_sets.values()), rel=1e-4)


def test_block_evaluator_on_group_limited_router():
    model = tiny_model("deepseek_v3", seed=1)
    adapter = get_adapter(model.config)
    layer = adapter.moe_layers()[0]
    X = [torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        Z = [adapter.block(model, layer)(X[0])]
    evaluate = block_evaluator(model, adapter, layer, X, Z)
    result = search(evaluate, 8, 2, groups=2, protected={0})
    assert result.evaluated == 3 * 4 and 0 not in result.dropped
    assert sorted(j // 4 for j in result.dropped) == [0, 1] and result.error > 0 and evaluate(()) < 1e-8


def test_search_against_brute_force_with_groups_and_protection():
    g = torch.Generator().manual_seed(5)
    table: dict[tuple[int, ...], float] = {}

    def evaluate(D):  # a non-additive error: random per subset, remembered so repeated calls agree
        return table.setdefault(D, float(torch.rand((), generator=g)))

    result = search(evaluate, 8, 4, groups=2, protected={1, 6})
    allowed = [D for D in itertools.combinations(range(8), 4)
               if not {1, 6} & set(D) and sum(j < 4 for j in D) == 2]
    assert set(table) == set(allowed) and result.evaluated == len(allowed) == 9 and result.exhaustive
    assert result.dropped == min(allowed, key=table.get)

    weights = torch.rand(12, generator=g).tolist()
    additive = lambda D: sum(weights[j] for j in D)  # noqa: E731  greedy is exact for additive errors
    for groups, protected in ((1, frozenset()), (3, frozenset({0, 5}))):
        greedy = search(additive, 12, 6, groups=groups, protected=protected, max_exhaustive=0, beam=1)
        exact = search(additive, 12, 6, groups=groups, protected=protected)
        assert exact.exhaustive and not greedy.exhaustive and greedy.dropped == exact.dropped
        assert exact.evaluated == (math.comb(12, 6) if groups == 1 else 3 * 3 * 6)  # C(3,2)·C(3,2)·C(4,2)
        assert not protected & set(greedy.dropped)
        assert greedy.evaluated == 57 if groups == 1 else greedy.evaluated < 57  # Σ_{i<6} (12 − i)


def test_search_and_evaluator_bad_input(qwen):
    ok = lambda D: float(len(D))  # noqa: E731
    for kwargs, msg in ((dict(n_drop=0), "n_drop"), (dict(n_drop=3, groups=2), "multiple of 2"),
                        (dict(n_drop=2, protected={9}), "outside"), (dict(n_drop=7, protected={0, 1}), "protect fewer"),
                        (dict(n_drop=8), "at least one must stay"), (dict(n_drop=2, max_exhaustive=-1), "max_exh")):
        with pytest.raises(MoePruneError, match=msg):
            search(ok, 8, **kwargs)
    with pytest.raises(MoePruneError, match="nan"):
        search(lambda D: float("nan"), 8, 2)
    model, adapter, X, Z = qwen
    with pytest.raises(MoePruneError, match="one cached output per input"):
        block_evaluator(model, adapter, LAYER, X, Z[:1])
    with pytest.raises(MoePruneError, match="differ in shape"):
        block_evaluator(model, adapter, LAYER, X, [Z[0], Z[1][:, :3]])

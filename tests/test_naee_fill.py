"""NAEE's candidate slots filled on demand (`select/naee_fill.py`): what the precompute fills, against each expert's
output computed by hand with the model's own experts module; that a fill never rewrites what scores already read;
and a whole beam search on lazily filled slots against the same search on the block-forward reference
(`reconstruction.block_evaluator`: the model's own block with the set masked in its own router)."""

from __future__ import annotations

import pytest
import torch

from moeprune.calibration.session import eager_experts
from moeprune.models import get_adapter
from moeprune.select.naee_candidates import candidate_count, first_unique
from moeprune.select.naee_fill import INITIAL_ROUNDS, grow_targets, initial_fill
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.tiny import tiny_model
from test_naee_fast import block_outputs

RTOL = 1e-6  # routers round their softmax in float32 (test_naee_incremental.py); the block forward is float64


def _case(num_experts: int, top_k: int, seed: int = 3):
    """A float64 Qwen3-MoE block, random inputs [2, 32, H] (no padding), outputs from its own block."""
    model = tiny_model("qwen3_moe", seed=seed, num_experts=num_experts, num_experts_per_tok=top_k).double()
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[-1]
    g = torch.Generator().manual_seed(seed)
    H = model.config.hidden_size
    X = [torch.randn(2, 32, H, generator=g, dtype=torch.float64) for _ in range(2)]
    return model, adapter, layer, X, block_outputs(model, adapter, layer, X)


def _by_hand(model, adapter, layer, x: torch.Tensor, experts: list[int]) -> torch.Tensor:
    """[len(experts), H]: each expert's output on token x [H] with gate weight 1, one experts call each."""
    module = adapter.experts(adapter.block(model, layer))
    one = torch.ones(1, 1, dtype=x.dtype)
    with torch.no_grad(), eager_experts(model):
        return torch.cat([module(x[None], torch.tensor([[j]]), one) for j in experts])


def test_grow_targets_whole_rounds_at_least_doubling():
    k, C = 4, 40
    for need in range(0, C):
        for filled in range(0, need + 1):
            got = int(grow_targets(torch.tensor([need]), torch.tensor([filled]), k, C))
            rounds = -(-(need + 1) // k) * k  # smallest multiple of k covering slot `need`
            assert got == min(C, max(rounds, 2 * filled)) and got > need


def test_the_precompute_fills_the_first_rounds_by_the_models_experts_and_leaves_the_rest_unset():
    model, adapter, layer, X, Z = _case(16, 2)
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, max_dropped=6)
    C, F = candidate_count(adapter, 6), initial_fill(candidate_count(adapter, 6), 2)
    assert (C, F) == (2 * (3 + 2), 2 * INITIAL_ROUNDS) and out.rows_computed == out.tokens * F
    gram, cross, order = out.gram[0], out.cross[0], out.order[0]
    assert bool((out.filled[0] == F).all())
    for t in (0, 17, 40):
        y = _by_hand(model, adapter, layer, out.x[0][t], order[t, :F].tolist())  # [F, H]
        torch.testing.assert_close(gram[t, :F, :F], y @ y.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cross[t, :F], y @ out.target[0][t], rtol=1e-12, atol=1e-12)
        assert bool(gram[t, F:].isnan().all()) and bool(gram[t, :, F:].isnan().all())
        assert bool(cross[t, F:].isnan().all())


def test_a_fill_writes_only_new_slots_and_scores_match_the_masked_block():
    model, adapter, layer, X, Z = _case(16, 2)
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, max_dropped=6)
        ev = incremental_evaluator(model, adapter, layer, out)
        ref = block_evaluator(model, adapter, layer, X, Z)
        before = out.gram[0].clone()
        F = int(out.filled[0][0])
        # one token's first 5 choices dropped: its route reaches slots 5 and 6, beyond F = 4
        D = tuple(sorted(out.order[0][0, :5].tolist()))
        assert ev(D) == pytest.approx(ref(D), rel=RTOL)
    filled = out.filled[0]
    grown = (filled > F).nonzero().view(-1)
    assert 0 in grown.tolist() and bool((filled[grown] % 2 == 0).all())
    old = before[grown][:, :F, :F]
    assert torch.equal(out.gram[0][grown][:, :F, :F], old)  # bit for bit: scores already read it
    for t in grown[:3].tolist():
        n = int(filled[t])
        y = _by_hand(model, adapter, layer, out.x[0][t], out.order[0][t, :n].tolist())  # [n, H]
        torch.testing.assert_close(out.gram[0][t, :n, :n], y @ y.T, rtol=1e-12, atol=1e-12)
        assert not bool(out.cross[0][t, :n].isnan().any())
    untouched = (filled == F).nonzero().view(-1)
    assert untouched.numel() > 0 and bool(out.gram[0][untouched][:, F:].isnan().all())
    # a sentinel in token 0's filled block (slot 0: its first choice, dropped below, so no score reads it) survives
    # the next fill of token 0, which reaches slot 8 = its filled count
    n0 = int(filled[0])
    out.gram[0][0, 0, 0] = -1.0
    D2 = tuple(sorted(out.order[0][0, :n0 - 1].tolist()))
    with eager_experts(model):
        assert ev(D2) == pytest.approx(ref(D2), rel=RTOL)
    assert int(out.filled[0][0]) > n0 and float(out.gram[0][0, 0, 0]) == -1.0


@pytest.mark.parametrize("num_experts,top_k,ratio", [(32, 4, 0.25), (16, 2, 0.5)])
def test_a_beam_search_on_slots_filled_on_demand_matches_the_block_search(num_experts, top_k, ratio):
    model, adapter, layer, X, Z = _case(num_experts, top_k)
    d = int(num_experts * ratio)
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, max_dropped=d)
        fast = search(incremental_evaluator(model, adapter, layer, out), num_experts, d, beam=2, max_exhaustive=1)
        slow = search(block_evaluator(model, adapter, layer, X, Z), num_experts, d, beam=2, max_exhaustive=1)
    assert fast.dropped == slow.dropped
    assert fast.error == pytest.approx(slow.error, rel=RTOL)
    C = candidate_count(adapter, d)
    assert out.tokens * initial_fill(C, top_k) <= out.rows_computed
    if num_experts == 32:  # the search reaches few slots beyond the first rounds: far fewer rows than every slot
        assert out.rows_computed < 0.75 * out.tokens * C


def test_first_unique_counts_entries_before_the_first_repeat():
    g = torch.Generator().manual_seed(0)
    cand = torch.randint(0, 6, (200, 5), generator=g)
    got = first_unique(cand)
    for row, n in zip(cand.tolist(), got.tolist(), strict=True):
        want = next((i for i in range(len(row)) if row[i] in row[:i]), len(row))
        assert n == want


def test_open_candidates_are_assigned_and_widened_as_routes_reach_them():
    """DeepSeek-V3, 16 experts in 4 groups, 2 kept, top-4 (masking can hand the selection to another group): each
    token starts with its first 2k = 8 choices in 12 slots; sets of up to 8 dropped experts reach others, which get
    slots (the capacity widens past 12), and every error equals the masked block's."""
    model = tiny_model("deepseek_v3", seed=3, n_routed_experts=16, n_group=4, topk_group=2,
                       num_experts_per_tok=4).double()
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[-1]
    g = torch.Generator().manual_seed(3)
    X = [torch.randn(2, 32, model.config.hidden_size, generator=g, dtype=torch.float64) for _ in range(2)]
    Z = block_outputs(model, adapter, layer, X)
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, max_dropped=4)
        assert out.open and out.gram[0].shape[1] == candidate_count(adapter, 4) == 12
        assert bool((out.assigned[0] <= 8).all()) and out.rows_computed <= out.tokens * 8
        ev = incremental_evaluator(model, adapter, layer, out)
        ref = block_evaluator(model, adapter, layer, X, Z)
        sets = [tuple(sorted(torch.randperm(16, generator=g)[:n].tolist())) for n in (2, 4, 6, 8) for _ in range(6)]
        sets = [D for D in sets if all(sum(1 for j in D if j // 4 == q) <= 2 for q in range(4))]  # routable
        for D, got in zip(sets, ev.many(sets), strict=True):
            assert got == pytest.approx(ref(D), rel=RTOL), D
    assert out.gram[0].shape[1] > 12 and int(out.assigned[0].max()) > 12  # widened for tokens that needed it
    order, slots = out.order[0], out.slots[0]
    for t in range(out.tokens):  # the slot table and the order agree; no expert twice
        n = int(out.assigned[0][t])
        held = order[t, :n].tolist()
        assert len(set(held)) == n and all(int(slots[t, e]) == i for i, e in enumerate(held))
        assert int((slots[t] >= 0).sum()) == n

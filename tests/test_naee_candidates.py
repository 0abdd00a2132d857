"""NAEE's precompute restricted to each token's candidate experts (`select/naee_candidates.py`): the candidates
against the router's own logits ranked by hand, and every error the search can ask for (sets up to `max_dropped`,
scored one at a time, batched and from a parent) against the block-forward reference (`reconstruction.
block_evaluator`: the model's own block with the set masked in its own router, every token)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from moeprune.calibration.session import eager_experts
from moeprune.errors import MoePruneError
from moeprune.models import get_adapter
from moeprune.select.naee_candidates import candidate_count
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.reconstruction import block_evaluator
from moeprune.tiny import FAMILY_CONFIGS, tiny_model
from test_naee_fast import block_outputs

RTOL = 1e-6  # routers round their softmax in float32 (test_naee_incremental.py); the block forward is float64


def _case(family: str, **overrides):
    """A float64 model of `family`, random block inputs [2, 24, H] with padding, outputs from its own block."""
    model = tiny_model(family, seed=6, **overrides).double()
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[-1]
    g = torch.Generator().manual_seed(6)
    H = model.config.get_text_config().hidden_size
    X = [torch.randn(2, 24, H, generator=g, dtype=torch.float64) for _ in range(2)]
    valid = [torch.rand(2, 24, generator=g) > 0.2 for _ in range(2)]
    return model, adapter, layer, X, block_outputs(model, adapter, layer, X), valid


def test_candidates_are_the_router_logits_first_choices():
    """Qwen3-MoE, 16 experts top-2: softmax is monotone, so a token's first C choices are its C largest logits."""
    model, adapter, layer, X, Z, valid = _case("qwen3_moe", num_experts=16)
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, valid, max_dropped=3)
    C = candidate_count(adapter, 3)
    assert C == 2 * (2 + 2) < 16 and out.gram[0].shape[1:] == (C, C) and out.cross[0].shape[1] == C
    router = adapter.router(adapter.block(model, layer))
    logits = F.linear(out.x[0], router.weight)  # [T, E] by hand
    want = logits.topk(C, dim=-1).indices  # [T, C]
    slots = out.slots[0]  # [T, E]
    for t in range(out.x[0].shape[0]):
        held = (slots[t] >= 0).nonzero().view(-1)
        assert set(held.tolist()) == set(want[t].tolist())
        assert sorted(slots[t][held].tolist()) == list(range(C))  # each slot used once


@pytest.mark.parametrize("family,overrides,d", [(f, {}, 1) for f in sorted(FAMILY_CONFIGS)] + [
    ("qwen3_moe", dict(num_experts=16), 3), ("gpt_oss", dict(num_local_experts=16), 3)])
def test_every_set_up_to_max_dropped_scores_as_the_masked_block(family, overrides, d):
    model, adapter, layer, X, Z, valid = _case(family, **overrides)
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, valid, max_dropped=d)
        local = adapter.routing().local_selection
        assert bool(out.slots) == (candidate_count(adapter, d) < adapter.num_experts)
        assert out.open == (bool(out.slots) and not local)  # a route may leave them: assigned when it does
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        ev = incremental_evaluator(model, adapter, layer, out)
        groups = adapter.routing().n_group if adapter.routing().group_limited else 1
        size = adapter.num_experts // groups
        sets = [D for n in range(1, d + 1) for D in itertools.combinations(range(adapter.num_experts), n)
                if all(sum(1 for j in D if j // size == g) <= size - 2 for g in range(groups))][::3]
        scale = out.target_sq
        for D, got in zip(sets, ev.many(sets), strict=True):
            assert got == pytest.approx(ref(D), rel=RTOL, abs=1e-12 * scale), (family, D)
        parent = sets[0]
        js = [j for j in range(adapter.num_experts) if j not in parent][:4]
        for j, got in zip(js, ev.extend(parent, js), strict=True):
            assert got == pytest.approx(ref(tuple(sorted((*parent, j)))), rel=RTOL, abs=1e-12 * scale)


def test_a_set_beyond_max_dropped_that_leaves_the_candidates_is_refused():
    model, adapter, layer, X, Z, valid = _case("qwen3_moe", num_experts=16)
    with eager_experts(model):
        out = expert_outputs(model, adapter, layer, X, Z, valid, max_dropped=1)  # C = 6
        ev = incremental_evaluator(model, adapter, layer, out)
        with pytest.raises(MoePruneError, match="outside the token's precomputed candidates"):
            ev(tuple(range(10)))  # 10 dropped: some token's route reaches its 7th choice or further


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grouped", [True, False])
def test_candidate_outputs_equal_each_pair_alone(dtype, grouped):
    """`candidate_outputs` through transformers' grouped kernel (every pair in one call, `stats/slots.slot_outputs`)
    and through the experts' own forward once per expert (eager); in bf16 on the CPU each group is rounded up to 32
    rows with zero rows (`io/kernel_cache.pad_rows`). Against the model's eager experts called on each (token,
    candidate) pair alone at gate weight 1 (no grouping, no padding): equal to the dtype's rounding."""
    from moeprune.select.naee_candidates import candidate_outputs
    from moeprune.stats.slots import uses_grouped_mm

    model = tiny_model("qwen3_moe", seed=6).eval().to(dtype)
    model.config._experts_implementation = "grouped_mm" if grouped else "eager"
    adapter = get_adapter(model.config, model=model)
    experts = adapter.experts(adapter.block(model, adapter.moe_layers()[0]))
    assert uses_grouped_mm(experts) == grouped
    g = torch.Generator().manual_seed(1)
    n, C, H, E = 40, 4, model.config.hidden_size, adapter.num_experts
    h = torch.randn(n, H, generator=g).to(dtype)
    cand = torch.stack([torch.randperm(E, generator=g)[:C] for _ in range(n)])  # [n, C] distinct per token
    out = torch.full((n, C, H), float("nan"), dtype=dtype)
    with torch.no_grad():
        assert candidate_outputs(experts, h, cand, out) == n * C
        with eager_experts(model):
            want = torch.stack([torch.cat([experts(h[t:t + 1], cand[t, s].view(1, 1), torch.ones(1, 1, dtype=dtype))
                                           for s in range(C)]) for t in range(n)])
    scale = float(want.float().abs().max())
    tol = dict(rtol=3e-2, atol=2e-2 * scale) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(out.float(), want.float(), **tol)

"""NAEE's incremental scoring under a group limit with several kept groups (`select/naee_reach.py`,
`RoutingSpec.group_reach`): the reach claim against the router masked by hand and its group scores computed by hand
from its logits; children from their parent against the block-forward reference (`reconstruction.block_evaluator`:
the model's own block with the set masked in its own router, every token); the fallback when the router's group
choices are not seen; the search's choice and its router rows."""

from __future__ import annotations

import logging

import pytest
import torch

from moeprune.calibration.session import eager_experts
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.select.auto_naee import naee_decision
from moeprune.select.naee_evaluator import fast_evaluator
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.tiny import tiny_model
from test_naee_fast import block_outputs

RTOL = 1e-6  # routers round their scores in float32 (test_naee_incremental.py); the block forward is float64
GROUPED = {  # 16 experts in 4 groups, 2 kept, top-4
    "deepseek_v3": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "glm4_moe": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
}


def _model(family: str, seed: int = 3, **extra):
    model = tiny_model(family, seed=seed, **{**GROUPED[family], **extra}).double()
    adapter = get_adapter(model.config, model=model)
    # a spread-out correction bias, so that groups compete on it as in a trained model
    router = adapter.router(adapter.block(model, adapter.moe_layers()[0]))
    E = adapter.num_experts
    router.e_score_correction_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model, adapter


def _by_hand(router, x: torch.Tensor, dropped) -> torch.Tensor:
    """[T, 16] bool: the experts whose masking can change each token's route under `dropped`, from the router's
    logits by hand: selected experts (the router's own top-k under the mask) and the top-2 of each kept group."""
    s = torch.sigmoid(x.float() @ router.weight.float().T)  # [T, E]
    s[:, list(dropped)] = float("-inf")
    c = (s + router.e_score_correction_bias).view(-1, router.num_group, 16 // router.num_group)  # [T, G, E/G]
    top2 = c.topk(2, dim=-1).indices  # [T, G, 2]
    kept = c.topk(2, dim=-1).values.sum(-1).topk(router.topk_group, dim=-1).indices  # [T, K]
    out = torch.zeros(x.shape[0], 16, dtype=torch.bool)
    for t in range(x.shape[0]):
        for g in kept[t].tolist():
            out[t, [g * (16 // router.num_group) + i for i in top2[t, g].tolist()]] = True
    return out


@pytest.mark.parametrize("family", sorted(GROUPED))
def test_only_tokens_a_new_drop_reaches_change_their_route(family):
    model, adapter = _model(family)
    assert adapter.routing().group_reach and not adapter.routing().local_masking
    layer = adapter.moe_layers()[0]
    router = adapter.router(adapter.block(model, layer))
    x = torch.randn(400, model.config.hidden_size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    widened = 0  # tokens moved that do not select j: the selection alone would have missed them
    with torch.no_grad():
        for parent in [(), (1,), (0, 6, 9)]:
            with masked_experts(model, adapter, {layer: list(parent)}):
                w, idx = router(x)[1:3]
            reach = _by_hand(router, x, parent)
            reach.scatter_(1, idx, True)
            for j in [j for j in range(16) if j not in parent]:
                with masked_experts(model, adapter, {layer: sorted((*parent, j))}):
                    w2, idx2 = router(x)[1:3]
                moved = (idx2.sort(-1).values != idx.sort(-1).values).any(-1)  # [T]
                assert not bool((moved & ~reach[:, j]).any()), (family, parent, j)
                widened += int((moved & ~(idx == j).any(-1)).sum())
                same = ~reach[:, j]
                torch.testing.assert_close(w2[same].sort(-1).values, w[same].sort(-1).values, rtol=1e-6, atol=0)
    assert widened > 0


def _cache(family: str, **extra):
    model, adapter = _model(family, **extra)
    layer = adapter.moe_layers()[-1]
    g = torch.Generator().manual_seed(7)
    X = [torch.randn(2, 40, model.config.hidden_size, generator=g, dtype=torch.float64) for _ in range(2)]
    valid = [torch.rand(2, 40, generator=g) > 0.1 for _ in range(2)]
    return model, adapter, layer, X, block_outputs(model, adapter, layer, X), valid


@pytest.mark.parametrize("family", sorted(GROUPED))
def test_children_from_their_parent_equal_the_masked_block_under_a_group_limit(family):
    model, adapter, layer, X, Z, valid = _cache(family)
    with eager_experts(model):
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        for chunk in (2048, 13):
            ev = incremental_evaluator(model, adapter, layer,
                                       expert_outputs(model, adapter, layer, X, Z, valid, chunk_tokens=chunk))
            for parent in [(), (2,), (2, 5, 12)]:
                js = [j for j in range(16) if j not in parent
                      and sum(1 for i in parent if i // 4 == j // 4) < 2]  # ≥ 2 experts left in j's group
                for j, got in zip(js, ev.extend(parent, js), strict=True):
                    want = ref(tuple(sorted((*parent, j))))
                    assert got == pytest.approx(want, rel=RTOL, abs=1e-12 * ev.outputs.target_sq), (parent, j)
            assert ev.checked and ev.local  # the run-time check agreed


def test_group_choices_not_seen_fall_back_to_whole_scoring(caplog):
    model, adapter, layer, X, Z, valid = _cache("deepseek_v3")
    with eager_experts(model):
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        ev = incremental_evaluator(model, adapter, layer, expert_outputs(model, adapter, layer, X, Z, valid))
        ev.groups = (8, 2)  # a wrong group count: no topk of that shape runs in the router
        log = logging.getLogger("moeprune")
        log.addHandler(caplog.handler)  # the CLI tests may have set propagate=False on it
        try:
            with caplog.at_level("WARNING", logger="moeprune"):
                got = ev.extend((), list(range(6)))
        finally:
            log.removeHandler(caplog.handler)
        assert "group choices" in caplog.text and not ev.local
        assert got == pytest.approx([ref((j,)) for j in range(6)], rel=RTOL)


def test_search_under_a_group_limit_picks_the_whole_choice_with_fewer_router_rows():
    """32 experts in 8 groups, 4 kept, top-4, half dropped (2 per group: C(4, 2)^8 sets, a beam search)."""
    model, adapter, layer, X, Z, valid = _cache("deepseek_v3", n_routed_experts=32, n_group=8, topk_group=4)
    router = adapter.router(adapter.block(model, layer))
    rows: list[int] = []
    with torch.no_grad(), eager_experts(model):
        outputs = expert_outputs(model, adapter, layer, X, Z, valid)
        hook = router.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
        try:
            inc = search(incremental_evaluator(model, adapter, layer, outputs), 32, 16, groups=8, max_exhaustive=0,
                         beam=2)
            inc_rows, rows[:] = sum(rows), []
            whole = search(fast_evaluator(model, adapter, layer, outputs), 32, 16, groups=8, max_exhaustive=0, beam=2)
            whole_rows = sum(rows)
        finally:
            hook.remove()
    assert inc.dropped == whole.dropped and inc.evaluated == whole.evaluated
    assert inc.error == pytest.approx(whole.error, rel=RTOL)
    assert inc_rows < 0.5 * whole_rows, (inc_rows, whole_rows)
    # auto's affordability estimate counts k + 2·topk_group rows per token and parent: a bound on what ran
    tokens = int(sum(int(v.sum()) for v in valid))
    decision = naee_decision(None, adapter, 16 / 32, tokens, 2, 0)
    assert decision["incremental"] and not decision["exhaustive"]
    estimate = decision["cost"] / len(adapter.moe_layers())
    assert inc_rows <= estimate <= 3 * inc_rows, (estimate, inc_rows)

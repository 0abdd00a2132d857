"""NAEE's incremental scoring (`select/naee_incremental.py`: a beam parent's children scored on the tokens that
selected the newly dropped expert) against the block-forward reference (`reconstruction.block_evaluator`: the
model's own block with the set masked in its own router, every token); the routing spec's locality claim
(`RoutingSpec.local_masking`) against the router itself, masked by hand; the run-time check that falls back when a
router is not local; per-row masks against one masked call per row; the search's choice and its router rows."""

from __future__ import annotations

import logging

import pytest
import torch

from moeprune.calibration.session import eager_experts
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts, masked_row_blocks, row_masks
from moeprune.select.auto_naee import naee_decision
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.tiny import FAMILY_CONFIGS, tiny_model
from test_naee_batched import cache64
from test_naee_fast import random_drops

# routers compute their softmax in float32 even in a float64 model: a renormalised weight rounds differently when
# another logit is masked (measured ≤ 4e-8 relative on these errors)
RTOL = 1e-6


def _router_case(family: str, **overrides):
    model = tiny_model(family, seed=3, **overrides)
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[0]
    x = torch.randn(512, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(5))
    return model, adapter, layer, adapter.router(adapter.block(model, layer)), x


@pytest.mark.parametrize("family,overrides", [(f, {}) for f in sorted(FAMILY_CONFIGS)] + [
    ("deepseek_v3", dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4))])
def test_local_masking_claim_holds_on_the_router_masked_by_hand(family, overrides):
    """Local: masking any expert a token does not select leaves its indices equal and its weights within float32
    rounding; not local: some unselected expert's mask moves some token's route."""
    model, adapter, layer, router, x = _router_case(family, **overrides)
    moved = 0.0
    with torch.no_grad():
        w, idx = router(x)[1:3]  # [T, k] each
        for j in range(adapter.num_experts):
            rows = ~(idx == j).any(-1)  # tokens that do not select j
            with masked_experts(model, adapter, {layer: [j]}):
                w2, idx2 = router(x)[1:3]
            if (idx2[rows] != idx[rows]).any():
                moved = float("inf")
                continue
            rel = (w2[rows].double() - w[rows].double()).abs() / w[rows].double().abs().clamp_min(1e-30)
            moved = max(moved, float(rel.max()))
    if adapter.routing().local_masking:
        assert moved <= 1e-6, (family, moved)
    else:
        assert moved > 1e-3, (family, moved)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_children_from_their_parent_equal_the_masked_block(family):
    model, adapter, layer, X, Z, valid = cache64(family)
    with eager_experts(model):
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        # 7-token chunks: several router chunks, the last one short
        for chunk in (2048, 7):
            ev = incremental_evaluator(model, adapter, layer,
                                       expert_outputs(model, adapter, layer, X, Z, valid, chunk_tokens=chunk))
            local = ev.local
            for parent in [(), *random_drops(adapter, 2, seed=len(family))]:
                groups = adapter.routing().n_group if adapter.routing().group_limited else 1
                size = adapter.num_experts // groups
                js = [j for j in range(adapter.num_experts) if j not in parent
                      and sum(1 for i in parent if i // size == j // size) < size - 2]  # routable children
                got = ev.extend(parent, js)
                for j, g in zip(js, got, strict=True):
                    want = ref(tuple(sorted((*parent, j))))
                    assert g == pytest.approx(want, rel=RTOL, abs=1e-12 * ev.outputs.target_sq), (family, parent, j)
            assert ev.checked == local and ev.local == local  # the run-time check agreed with the spec


def test_a_router_that_is_not_local_is_caught_and_scored_whole(caplog):
    """Qwen2-MoE's un-normalised softmax: told it is local, the first extension disagrees with whole scoring;
    the evaluator warns, returns the whole scores and keeps scoring whole."""
    model, adapter, layer, X, Z, valid = cache64("qwen2_moe")
    assert not adapter.routing().local_masking
    with eager_experts(model):
        ev = incremental_evaluator(model, adapter, layer, expert_outputs(model, adapter, layer, X, Z, valid))
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        ev.local = True  # a wrong spec
        log = logging.getLogger("moeprune")
        log.addHandler(caplog.handler)  # the CLI tests may have set propagate=False on it
        try:
            with caplog.at_level("WARNING", logger="moeprune"):
                got = ev.extend((), list(range(8)))
        finally:
            log.removeHandler(caplog.handler)
        assert "not local" in caplog.text and not ev.local
        for j, g in enumerate(got):
            assert g == pytest.approx(ref((j,)), rel=1e-9)
        assert ev.extend((3,), [0, 5]) == pytest.approx([ref((0, 3)), ref((3, 5))], rel=1e-9)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_row_masks_route_each_row_as_its_own_masked_call(family):
    model, adapter, layer, router, x = _router_case(family)
    x = x[:40]
    extra = torch.randint(0, adapter.num_experts, (40,), generator=torch.Generator().manual_seed(1))
    parent = (2,) if family == "qwen3_moe" else ()
    with torch.no_grad():
        with masked_row_blocks(model, adapter, layer, row_masks(adapter, parent, extra)) as hits:
            got = router(x)
        assert hits["calls"] == hits["hits"] == 1
        for r in range(40):
            with masked_experts(model, adapter, {layer: sorted({*parent, int(extra[r])})}):
                want = router(x[r:r + 1])
            assert torch.equal(got[2][r], want[2][0]), r
            # a 40-row and a 1-row float32 router GEMM may round differently (AVX-512 hosts: a few ulps, ~2e-6)
            torch.testing.assert_close(got[1][r], want[1][0], rtol=1e-5, atol=0)
    with pytest.raises(Exception, match="cannot mask"):
        row_masks(adapter, (), torch.tensor([adapter.num_experts]))


def test_search_picks_the_block_forward_choice_with_fewer_router_rows():
    """16 experts, top-2, a beam: the incremental search drops the same set as the block-forward evaluator's
    search, with the same number of sets scored, and routes fewer rows than scoring every child whole."""
    model = tiny_model("qwen3_moe", seed=4, num_experts=16).double()
    adapter = get_adapter(model.config, model=model)
    layer = adapter.moe_layers()[-1]
    g = torch.Generator().manual_seed(4)
    X = [torch.randn(2, 40, model.config.hidden_size, generator=g, dtype=torch.float64) for _ in range(2)]
    block, router = adapter.block(model, layer), adapter.router(adapter.block(model, layer))
    rows = []
    with torch.no_grad(), eager_experts(model):
        Z = [block(x) for x in X]
        Z = [z[0] if isinstance(z, tuple) else z for z in Z]
        outputs = expert_outputs(model, adapter, layer, X, Z)
        hook = router.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
        try:
            inc = search(incremental_evaluator(model, adapter, layer, outputs), 16, 6, max_exhaustive=0, beam=2)
            inc_rows, rows[:] = sum(rows), []
            whole = incremental_evaluator(model, adapter, layer, outputs)
            whole.local = False  # every child whole (`many`), as before this evaluator
            many = search(whole, 16, 6, max_exhaustive=0, beam=2)
            many_rows = sum(rows)
        finally:
            hook.remove()
        want = search(block_evaluator(model, adapter, layer, X, Z), 16, 6, max_exhaustive=0, beam=2)
    assert inc.dropped == many.dropped == want.dropped and inc.evaluated == want.evaluated
    assert inc.error == pytest.approx(want.error, rel=RTOL)
    assert inc_rows < many_rows / 2, (inc_rows, many_rows)
    # auto's affordability estimate (router rows of the search) against the rows counted here, per layer
    decision = naee_decision(None, adapter, 6 / 16, 160, 2, 0)
    assert decision["incremental"] and decision["tokens"] == 160
    estimate = decision["cost"] / len(adapter.moe_layers())
    assert 0.8 * inc_rows <= estimate <= 1.25 * inc_rows, (estimate, inc_rows)

"""NAEE's batched candidate scoring (`FastEvaluator.many`: b sets per router call under a per-row-block mask)
against the one-set-at-a-time evaluator and the block-forward reference (`reconstruction.block_evaluator`), on
float64 copies of every family so that the three agree to float64 rounding; `masked_rows` against the plain
`masked_experts` it generalises; the search's batched calls against its one-call-per-set path."""

from __future__ import annotations

import pytest
import torch

from moeprune.calibration.session import eager_experts
from moeprune.errors import MoePruneError
from moeprune.models.masking import masked_experts, masked_rows
from moeprune.select.naee_evaluator import fast_evaluator
from moeprune.select.naee_outputs import expert_outputs
from moeprune.select.reconstruction import block_evaluator, search
from moeprune.tiny import FAMILY_CONFIGS
from test_naee_fast import block_outputs, cache, random_drops

# float64 model, float64 sums: the Gram form and the block forward differ by rounding only. Its size is relative
# to the terms that cancel (‖U‖², ⟨U, y⟩, ⟨y, y⟩ all ≈ target_sq), so D = ∅ (0 exactly) is checked against that.
RTOL = 1e-12


def cache64(family: str, seed: int = 2):
    """`cache` with the model and inputs in float64 and Z recomputed by the float64 block."""
    model, adapter, layer, X, _, valid = cache(family, seed=seed)
    model = model.double()
    X = [x.double() for x in X]
    return model, adapter, layer, X, block_outputs(model, adapter, layer, X), valid


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_batched_errors_equal_one_at_a_time_and_block_forward(family):
    model, adapter, layer, X, Z, valid = cache64(family)
    drops = [(), *random_drops(adapter, 11, seed=len(family) + 1)]
    with eager_experts(model):
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        want = [ref(D) for D in drops]
        # one chunk (the default size): DeepSeek-V3 / GLM-4 routers compute their logits in float32, whose last bit
        # can depend on the GEMM's row count; several chunks (7 tokens, the last one short) are compared with the
        # one-at-a-time evaluator on the same chunks
        for chunk in (2048, 7):
            outputs = expert_outputs(model, adapter, layer, X, Z, valid, chunk_tokens=chunk)
            assert len(outputs.x) == 1 if chunk == 2048 else len(outputs.x) > 2 and outputs.x[-1].shape[0] < 7
            single = fast_evaluator(model, adapter, layer, outputs)
            one = [single(D) for D in drops]
            for b in (1, 5, len(drops)):  # groups of b sets per router call, the last one short for b = 5
                got = fast_evaluator(model, adapter, layer, outputs, batch=b).many(drops)
                scale = outputs.target_sq
                assert max(abs(got[0]), abs(one[0]), abs(want[0])) <= RTOL * scale
                for D, g, o, w in zip(drops[1:], got[1:], one[1:], want[1:], strict=True):
                    assert g == pytest.approx(o, rel=RTOL), (family, chunk, b, D)
                    assert chunk != 2048 or g == pytest.approx(w, rel=RTOL), (family, b, D)
    assert min(want[1:]) > 1e-3 * outputs.target_sq  # the drops really change the block output


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])  # one per masked op / routing kind
def test_masked_rows_equals_one_masked_call_per_row_block(family):
    model, adapter, layer, X, _, _ = cache(family)
    router = adapter.router(adapter.block(model, layer))
    x = X[0].reshape(-1, X[0].shape[-1])  # [c, H]
    drops = random_drops(adapter, 4, seed=3)
    with torch.no_grad():
        with masked_rows(model, adapter, layer, drops) as hits:
            got = router(x.repeat(len(drops), 1))  # [4·c, ...] rows of set g: g·c..(g+1)·c
        assert (hits["calls"], hits["hits"]) == (1, 1)  # one router call, its masked ops all hit
        assert set(hits["ops"]) == set(adapter.routing().masked_ops) and all(n == 1 for n in hits["ops"].values())
        for g, D in enumerate(drops):
            with masked_experts(model, adapter, {layer: list(D)}):
                want = router(x)
            for a, b in zip(got[1:], want[1:], strict=True):  # gate weights, expert indices
                assert torch.equal(a[g * len(x):(g + 1) * len(x)], b), (family, D)
        with pytest.raises(MoePruneError, match="found no"):  # 3 sets cannot split 4·c rows in equal blocks
            with masked_rows(model, adapter, layer, drops[:3]):
                router(x[:5].repeat(4, 1))


def test_search_scores_each_step_in_one_batched_call():
    model, adapter, layer, X, Z, valid = cache64("qwen3_moe", seed=7)
    with eager_experts(model):
        fast = fast_evaluator(model, adapter, layer, expert_outputs(model, adapter, layer, X, Z, valid), batch=4)
        ref = block_evaluator(model, adapter, layer, X, Z, valid)
        calls: list[int] = []
        many = fast.many
        fast.many = lambda drops: calls.append(len(drops)) or many(drops)  # record the batch sizes
        for kwargs, sizes in ((dict(), [70]), (dict(max_exhaustive=0, beam=2), None)):
            calls.clear()
            got = search(fast, 8, 4, **kwargs)
            want = search(ref, 8, 4, **kwargs)  # the block evaluator: one call per set
            assert got.dropped == want.dropped and got.evaluated == want.evaluated == sum(calls)
            assert got.error == pytest.approx(want.error, rel=RTOL)
            assert calls == sizes if sizes else (len(calls) == 4 and calls[0] == 8)  # one call per beam step

"""Prune-as-you-go's replayed re-run (`calibration/expert_replay.py`) against the model's own masked MoE block, for
every family moeprune has an adapter for (the tiny testbed families and transformers' own MoE families): the
outputs agree, and exactly the rows whose route the mask changed are recomputed (counted independently from the
experts module's inputs with and without the mask)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from moeprune.calibration.expert_replay import ExpertReplay, row_prints
from moeprune.io.stock import runnable
from moeprune.models import get_adapter
from moeprune.models.families import REFUSED
from moeprune.models.masking import masked_experts
from moeprune.models.registry import ADAPTERS
from moeprune.tiny import FAMILY_CONFIGS, tiny_model
from moeprune.tiny_families import NOT_BUILDABLE, moe_model_types, tiny_family_model

RTOL, ATOL = 1e-5, 1e-6  # float32 blocks: served rows were computed in a call over other rows than the reference's


def _out(z):
    return z[0] if isinstance(z, tuple) else z  # gpt-oss's block also returns router scores


def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


def _routes(experts, model, ids, ctx) -> list[tuple[torch.Tensor, ...]]:
    """(hidden, indices, weights) the experts module receives per call: a plain forward pre-hook (reference)."""
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(tuple(a.detach().clone() for a in args)))
    try:
        with ctx():
            _logits(model, ids)
    finally:
        handle.remove()
    return seen


TRANSFORMERS_FAMILIES = [t for t in moe_model_types() if t not in NOT_BUILDABLE and t not in REFUSED and t in ADAPTERS]


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS) + [f"hf:{t}" for t in TRANSFORMERS_FAMILIES])
def test_replayed_rerun_equals_the_masked_model(family):
    """Whole-model forwards (the decoder layer may itself be the MoE block, as in Gemma-4): the last MoE layer's
    experts calls are recorded in a plain forward, then a forward with the busiest expert masked in that layer's
    router is served by the replay; its logits equal the masked forward computed in full."""
    torch.manual_seed(0)
    model = runnable(tiny_family_model(family[3:]) if family.startswith("hf:") else tiny_model(family, seed=2))
    adapter = get_adapter(model.config)
    layer = adapter.moe_layers()[-1]
    experts = adapter.experts(adapter.block(model, layer))
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    replay = ExpertReplay(experts)
    with torch.no_grad():
        with replay.record():
            plain = _logits(model, ids)
        before = _routes(experts, model, ids, nullcontext) if replay.supported else []
        use = torch.zeros(adapter.num_experts)
        for _, idx, _ in before:  # routes to extra router classes (zero experts) are not experts: left out
            idx = idx.reshape(-1)
            use += torch.bincount(idx[idx < adapter.num_experts], minlength=adapter.num_experts)
        drop = [int(use.argmax())]  # the busiest expert: many rows change route
        masked = lambda: masked_experts(model, adapter, {layer: drop})  # noqa: E731
        with masked():
            ref = _logits(model, ids)
        with masked(), replay.replaying():
            got = _logits(model, ids)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    if not replay.supported:  # pre-scaled experts: nothing recorded, the re-run computes everything
        assert replay.rows == replay.recomputed == 0
        return
    after = _routes(experts, model, ids, masked)
    changed = sum(int(((b[1] != a[1]).any(-1) | (b[2] != a[2]).any(-1)).sum()) for b, a in zip(before, after,
                                                                                              strict=True))
    assert replay.rows == sum(b[1].shape[0] for b in before)
    assert replay.recomputed == changed
    assert 0 < changed, "the busiest expert's rows must change route"
    assert not torch.equal(got, plain)


def test_rows_that_reach_the_experts_with_other_inputs_are_recomputed():
    """A row whose hidden state differs from the recording (same route) is recomputed, not served."""
    model = tiny_model("qwen3_moe", seed=2)
    adapter = get_adapter(model.config)
    layer = adapter.moe_layers()[0]
    block = adapter.block(model, layer)
    replay = ExpertReplay(adapter.experts(block))
    x = torch.randn(1, 10, adapter.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with replay.record():
            block(x)
        y = x.clone()
        y[0, 4, 0] = torch.nextafter(y[0, 4, 0], torch.tensor(1e9))  # one ulp on one element: the route may stay
        ref = _out(block(y))
        with replay.replaying():
            got = _out(block(y))
    assert (replay.rows, replay.recomputed) == (10, 1)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def test_row_prints_tell_rows_apart_by_bits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    y = x.clone()
    y[7, 11] = -y[7, 11]  # one element's sign bit
    y[9] = x[9].flip(0)  # same values, other order
    p, q = row_prints(x), row_prints(y)
    assert torch.equal(p == q, torch.tensor([i not in (7, 9) for i in range(64)]))
    assert torch.equal(row_prints(x.clone()), p)

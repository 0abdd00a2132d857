"""∂(summed NLL)/∂h_L a chunk of positions at a time (`stats/head_gradient.nll_gradient`) against autograd through
the model's own whole forward: a hook makes the last decoder layer's output a leaf, and `summed_nll` over the
model's whole logits is backpropagated to it. Every supported family (both HEAPr paths, in memory and layer by
layer, take their head gradient from `nll_gradient`); families with logit post-processing (Cohere2-MoE's logit
scale, Granite-MoE's logits scaling, Gemma 4's soft-capping) are where `lm_head(norm(h))` alone gives other
gradients."""

from __future__ import annotations

import pytest
import torch

from head_spy import spy_head_logits
from moeprune.calibration import engine
from moeprune.io.stock import runnable
from moeprune.models import get_adapter
from moeprune.pipeline.verify import seeded_inputs
from moeprune.stats import head_gradient
from moeprune.stats.neurons import summed_nll
from moeprune.tiny import tiny_model
from moeprune.tiny_families import tiny_family_model

SPECIAL = {"cohere2_moe": {},  # logit_scale 0.0625 by default
           "granitemoe": {"logits_scaling": 4.0}, "gemma4_text": {"final_logit_softcapping": 5.0}}


def _supported() -> list[str]:
    """Every buildable MoE family of the installed transformers that moeprune has an adapter for and does not
    refuse (a wrapper counts by its text model's type)."""
    from moeprune.models.families import REFUSED
    from moeprune.models.registry import ADAPTERS
    from moeprune.tiny_families import NOT_BUILDABLE, moe_model_types, tiny_family_config

    out = []
    for mt in moe_model_types():
        if mt in NOT_BUILDABLE:
            continue
        config = tiny_family_config(mt)
        types = {mt, getattr(config.get_text_config(), "model_type", mt)}
        if types & set(ADAPTERS) and not types & set(REFUSED):
            out.append(mt)
    return out


FAMILIES = _supported()


def _model(family: str):
    over = SPECIAL.get(family, {})
    model = tiny_model(family, seed=2) if family == "qwen3_moe" else tiny_family_model(family, seed=2, **over)
    return runnable(model.eval())  # a wrapper without a forward (Qwen3-Omni-MoE) runs through its thinker


def _reference(model, adapter, x) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_L, ∂L/∂h_L) by autograd through the model's whole forward and its whole logits."""
    leaf = {}

    def make_leaf(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_(True)
        leaf["h"] = h
        return (h, *output[1:]) if isinstance(output, tuple) else h

    hook = adapter.decoder_layers(model)[-1].register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            summed_nll(model(**x, use_cache=False).logits, x["input_ids"], x["attention_mask"]).backward()
    finally:
        hook.remove()
    return leaf["h"].detach(), leaf["h"].grad


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_in_chunks_equals_autograd_through_the_whole_forward(family, monkeypatch):
    model = _model(family)
    adapter = get_adapter(model.config, model=model)
    x = seeded_inputs(min(96, model.get_input_embeddings().weight.shape[0]), batch=3, seq_len=14, seed=4)
    x["attention_mask"][0, -3:] = 0  # a right-padded row too (the last row is left-padded)
    h, want = _reference(model, adapter, x)
    model.zero_grad(set_to_none=True)
    calls = spy_head_logits(monkeypatch, head_gradient)
    got = head_gradient.nll_gradient(model, adapter, x, h, max_bytes=16 * 3 * 96 * 4)  # 4 positions per chunk
    chunks = [4, 4, 4, 1] if engine.takes_logits_to_keep(model) else [14]  # the 13 predicting positions
    assert [w for w, _ in calls] == chunks
    assert want.abs().max() > 1e-3 and torch.equal(want[0, -3:], torch.zeros_like(want[0, -3:]))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # float32 rounding of other matmul shapes
    assert all(p.grad is None for p in model.parameters())  # no weight received a gradient


def test_the_logit_post_processing_matters():
    """Without Granite's logits scaling (lm_head(norm(h)) alone) the gradient is another one: the case is live."""
    model = _model("granitemoe")
    adapter = get_adapter(model.config, model=model)
    x = seeded_inputs(96, batch=2, seq_len=10, seed=1)
    h, want = _reference(model, adapter, x)
    with torch.enable_grad():
        hh = h.clone().requires_grad_(True)
        summed_nll(model.lm_head(model.model.norm(hh)), x["input_ids"], x["attention_mask"]).backward()
    assert (hh.grad - want).abs().max() > 0.1 * want.abs().max()

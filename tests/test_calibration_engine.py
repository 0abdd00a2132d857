"""The layer-by-layer engine feeds every decoder layer exactly what a whole-model forward feeds it
(hidden states, causal/padding/sliding-window masks, position ids, rotary embeddings), on every family."""

from __future__ import annotations

import pytest
import torch

from moeprune.calibration.engine import capture, run_layers
from moeprune.models import get_adapter
from moeprune.pipeline.verify import seeded_inputs
from moeprune.tiny import FAMILY_CONFIGS, tiny_model


def whole_model_layer_inputs(model, adapter, inputs):
    """Reference: hooks record each decoder layer's real input during one ordinary forward."""
    layers = adapter.decoder_layers(model)
    seen: list[tuple[torch.Tensor, dict]] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"], k)),
                                             with_kwargs=True) for layer in layers]
    outs: list[torch.Tensor] = []
    hooks.append(layers[-1].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen, outs[0]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_layer_by_layer_equals_whole_model(family):
    model = tiny_model(family, seed=0)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=24, seed=1)  # last row left-padded; 24 > gpt-oss window 16
    reference, final = whole_model_layer_inputs(model, adapter, inputs)
    batch = capture(model, adapter, inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(batch.hidden, reference[0][0])
    for i, (_, ref_kwargs) in enumerate(reference):
        got = batch.kwargs[i]
        for key, value in ref_kwargs.items():
            if key in ("past_key_values", "past_key_value", "hidden_states"):
                continue
            assert _same(got.get(key), value), (family, i, key)
    inputs_seen = [batch.hidden.clone()]
    for _, outputs in run_layers(model, adapter, [batch]):
        inputs_seen.append(outputs[0])
    for i, (ref_hidden, _) in enumerate(reference):
        assert torch.equal(inputs_seen[i], ref_hidden), (family, i)
    assert torch.equal(inputs_seen[-1], final)


def test_a_lost_mask_would_be_caught():
    """Sanity of the reference: dropping the padding mask changes the layer inputs, so the test above can fail."""
    model = tiny_model("qwen3_moe", seed=0)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=2, seq_len=12, seed=1)
    masked, _ = whole_model_layer_inputs(model, adapter, inputs)
    unmasked, _ = whole_model_layer_inputs(model, adapter, {"input_ids": inputs["input_ids"]})
    assert not torch.equal(masked[1][0][-1], unmasked[1][0][-1])  # the padded row sees different context


def test_calibration_uses_the_model_experts_impl_and_eager_on_request(monkeypatch):
    """transformers dispatches experts on config._experts_implementation (grouped_mm by default); calibration runs
    the model's own setting (the grouped kernel a plain forward uses: its two grouped linears per MoE layer and
    batch, the probes riding along), `eager=True` forces the per-expert loop, and the setting is given back
    afterwards either way."""
    from transformers.integrations import moe

    from moeprune.calibration.data import CalibSet
    from moeprune.calibration.session import collect

    model = tiny_model("qwen3_moe", seed=0)
    adapter = get_adapter(model.config)
    model.config._experts_implementation = "grouped_mm"
    calls = []
    original = moe._grouped_linear

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(moe, "_grouped_linear", spy)
    inputs = seeded_inputs(96, batch=2, seq_len=8, seed=1)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    assert len(calls) == 2 * len(adapter.moe_layers()), "the spy must see ordinary forwards, or this proves nothing"
    sets = [CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)]
    calls.clear()
    collect(model, adapter, sets)
    assert len(calls) == 2 * len(adapter.moe_layers())  # one grouped pass per MoE layer and batch
    calls.clear()
    collect(model, adapter, sets, eager=True)
    assert not calls
    assert model.config._experts_implementation == "grouped_mm"


def test_kwargs_the_layers_share_move_once_per_batch():
    """`to_device` with a memo moves a tensor that several layers' kwargs hold (the rotary cos/sin the model
    computes once per forward) once and keeps it one tensor: a GPU run copies it once per batch, not per layer."""
    from moeprune.calibration.engine import to_device

    model = tiny_model("qwen3_moe", seed=0)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=2, seq_len=8, seed=1)
    batch = capture(model, adapter, inputs["input_ids"], inputs["attention_mask"])
    assert len(batch.kwargs) >= 2
    cos = [kw["position_embeddings"][0] for kw in batch.kwargs]
    assert all(c is cos[0] for c in cos), "the model shares cos/sin across layers, or this proves nothing"
    moved = to_device(batch.kwargs, "meta", memo={})
    assert all(kw["position_embeddings"][0] is moved[0]["position_embeddings"][0] for kw in moved)
    assert moved[0]["position_embeddings"][0].is_meta and moved[0]["position_embeddings"][0].shape == cos[0].shape
    plain = to_device(batch.kwargs, "meta")  # without a memo every layer gets its own copy
    assert plain[0]["position_embeddings"][0] is not plain[1]["position_embeddings"][0]


def test_a_layer_forward_set_on_the_instance_survives_capture_and_the_head():
    """A decoder layer whose forward is an instance attribute (as accelerate's hooks set it) has that same forward
    after `capture` and after `layers_return` (the head's logits for verify), and the model's logits are unchanged;
    before, both deleted the attribute (the class's forward showed again)."""
    from moeprune.calibration.engine import layers_return

    model = tiny_model("qwen3_moe", seed=1)
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    calls = []
    own = layers[1].forward  # bound class forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    layers[1].forward = hooked
    inputs = seeded_inputs(model.config.vocab_size, 2, 8, seed=0)
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
        assert calls == [1]
        capture(model, adapter, inputs["input_ids"], inputs["attention_mask"])
        assert layers[1].__dict__.get("forward") is hooked
        with layers_return(model, adapter, torch.zeros(2, 8, model.config.hidden_size)):
            assert layers[1].forward is not hooked
        assert layers[1].__dict__.get("forward") is hooked and "forward" not in layers[0].__dict__
        got = model(**inputs, use_cache=False).logits
    assert calls == [1, 1] and torch.equal(got, want)

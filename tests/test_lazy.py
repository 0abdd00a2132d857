"""Lazy loading (`io/lazy.py`) equals `from_pretrained` bit for bit on every family: the materialised decoder
layers, the modules around them (embeddings, norms, rotary buffers), and a whole layer-by-layer calibration run."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from moeprune.calibration.engine import capture, run_layers
from moeprune.errors import MoePruneError
from moeprune.io.lazy import REST, load_lazy
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.pipeline.verify import seeded_inputs
from moeprune.tiny import FAMILY_CONFIGS, save_tiny

FAMILIES = sorted(FAMILY_CONFIGS)


def _assert_same(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), (where, sorted(got.keys() ^ want.keys()))
    for k, v in got.items():
        assert v.dtype == want[k].dtype, (where, k, v.dtype, want[k].dtype)
        assert torch.equal(v, want[k]), (where, k)


def _tensors(module, skip: tuple[str, ...]) -> dict:
    """Parameters and all buffers (non-persistent ones such as rotary inv_freq included), minus `skip` prefixes."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {n: t for n, t in named if not n.startswith(skip)}


def _on_meta(module) -> bool:
    return all(t.is_meta for t in _tensors(module, ()).values())


@pytest.mark.parametrize("dtype, load", [(torch.float32, "auto"), (torch.bfloat16, "auto"),
                                         (torch.bfloat16, "float32")], ids=["f32", "bf16", "bf16-read-as-f32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_materialised_layers_equal_eager(family, dtype, load, tmp_path):
    """bf16-read-as-f32: a bf16 checkpoint computed in float32, whose layers' tensors are built in bf16 by
    transformers' converters and widened once (`io/lazy_narrow.py`); still equal to from_pretrained(float32)."""
    path = save_tiny(family, tmp_path / family, dtype=dtype, max_shard_size="40KB")  # several shards
    eager, lazy = load_model(path, load), load_lazy(path, load)
    narrowed = {name for layer in lazy.narrow.values() for name in layer}
    if load == "float32":  # the narrow read is really taken, for the fused experts too
        assert any(".experts." in name or "block_sparse_moe" in name for name in narrowed), sorted(narrowed)[:5]
    adapter = get_adapter(eager.config)
    eager_layers, lazy_layers = adapter.decoder_layers(eager), lazy.layers
    head = "lm_head."
    # everything but the decoder layers and the head is materialised at load time, and equal
    _assert_same(_tensors(lazy.model, (lazy.layer_prefix + ".", head)),
                 _tensors(eager, (lazy.layer_prefix + ".", head)), "rest")
    assert any(n.endswith("inv_freq") for n in _tensors(lazy.model, ()))  # the rotary buffers were compared
    assert lazy.model.lm_head.weight.is_meta  # unused by calibration
    assert all(_on_meta(layer) for layer in lazy_layers)
    for i, eager_layer in enumerate(eager_layers):
        with lazy.layer(i) as layer:
            assert layer is lazy_layers[i]
            _assert_same(layer.state_dict(), eager_layer.state_dict(), f"layer {i}")
            _assert_same(_tensors(layer, ()), _tensors(eager_layer, ()), f"layer {i} (buffers)")
        assert _on_meta(lazy_layers[i]), f"layer {i} still holds memory after the context"


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_calibration_equals_eager(family, tmp_path):
    path = save_tiny(family, tmp_path / family, seed=3)
    eager, lazy = load_model(path), load_lazy(path)
    adapter = get_adapter(lazy.model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=24, seed=1)  # padded row; 24 > gpt-oss sliding window 16

    def run(model, layer_context):
        batch = capture(model, adapter, inputs["input_ids"], inputs["attention_mask"])
        outputs = [out[0] for _, out in run_layers(model, adapter, [batch], layer_context=layer_context)]
        return batch, outputs

    (eager_batch, eager_out), (lazy_batch, lazy_out) = run(eager, None), run(lazy.model, lazy.layer)
    for i, (a, b) in enumerate(zip(lazy_out, eager_out, strict=True)):
        assert torch.equal(a, b), (family, i)
    assert torch.equal(lazy_batch.hidden, eager_batch.hidden)
    assert lazy_batch.hidden.abs().max() > 0
    assert all(_on_meta(layer) for layer in lazy.layers)


def test_each_layer_reads_only_its_own_tensors(tmp_path):
    path = save_tiny("mixtral", tmp_path / "mixtral", max_shard_size="40KB")  # block_sparse_moe.experts.J.w1
    lazy = load_lazy(path)
    for i in range(len(lazy.layers)):
        assert lazy.keys[i] and all(re.match(rf"model\.layers\.{i}\.", k) for k in lazy.keys[i])
    assert not any(".layers." in k or k.startswith("lm_head") for k in lazy.keys[REST])


def test_layer_released_when_the_body_raises(tmp_path):
    lazy = load_lazy(save_tiny("olmoe", tmp_path / "olmoe"))
    with pytest.raises(RuntimeError, match="boom"), lazy.layer(1):
        assert not _on_meta(lazy.layers[1])
        raise RuntimeError("boom")
    assert _on_meta(lazy.layers[1])


def test_explicit_dtype_and_tied_head(tmp_path):
    path = save_tiny("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    eager, lazy = load_model(path, "bfloat16"), load_lazy(path, "bfloat16", head=True)
    assert lazy.model.lm_head.weight is lazy.model.model.embed_tokens.weight  # tied, as from_pretrained does
    _assert_same(_tensors(lazy.model, ("model.layers.",)), _tensors(eager, ("model.layers.",)), "rest")
    with lazy.layer(2) as layer:
        assert layer.mlp.experts.gate_up_proj.dtype == torch.bfloat16
        _assert_same(layer.state_dict(), eager.model.layers[2].state_dict(), "layer 2")


def test_quantized_checkpoint_refused(tmp_path):
    path = save_tiny("qwen3_moe", tmp_path / "q")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoePruneError, match="quantized"):
        load_lazy(path)


def test_tensors_of_extra_layers_are_left_unread(tmp_path, caplog):
    """Hub checkpoints may hold layers the model does not build (DeepSeek-V3's MTP layer): skipped, as
    from_pretrained skips them."""
    from safetensors.torch import save_file

    path = save_tiny("qwen3_moe", tmp_path / "mtp")  # 3 decoder layers: 0..2
    save_file({"model.layers.3.mlp.gate.weight": torch.ones(8, 32)}, str(path / "extra.safetensors"))
    log = logging.getLogger("moeprune")
    log.addHandler(caplog.handler)  # the CLI tests may have set propagate=False on it
    try:
        with caplog.at_level("INFO", logger="moeprune"):
            lazy = load_lazy(path)
    finally:
        log.removeHandler(caplog.handler)
    assert "model.layers.3.mlp.gate.weight" in caplog.text
    assert not any("layers.3." in k for ks in lazy.keys.values() for k in ks)
    eager = load_model(path)
    with lazy.layer(2) as layer:
        _assert_same(layer.state_dict(), eager.model.layers[2].state_dict(), "layer 2")

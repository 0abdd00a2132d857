"""Prune-as-you-go's re-run answers what each decoder layer computes before its MoE block from the calibration pass
(`calibration/before_block.py`). Reference: the same run with every re-run computed in full (the replay switched
off), for every family moeprune has an adapter for (the tiny testbed families and transformers' own MoE families).
The choices and every layer's statistics agree bit for bit, and the replay really answered calls (counted). Over
its memory budget a layer keeps nothing and its re-run is computed in full, with the same result."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from moeprune.calibration.before_block import BeforeBlock
from moeprune.calibration.session import collect
from moeprune.criteria import CRITERIA
from moeprune.io.stock import runnable
from moeprune.models import get_adapter
from moeprune.pipeline.verify import seeded_inputs
from moeprune.select.progressive import criterion_decider
from moeprune.tiny import FAMILY_CONFIGS, tiny_model
from moeprune.tiny_families import tiny_family_model
from test_expert_replay import TRANSFORMERS_FAMILIES
from test_progressive import calib_set


def _run(model, adapter, data):
    decide = criterion_decider(CRITERIA.get("frequency"), 0.5, adapter.routing(), adapter.num_experts)
    return collect(model, adapter, [data], decide=decide)


def _same(a, b) -> None:
    assert a.dropped == b.dropped and a.dropped
    for layer, st in a.stats["s"].items():
        other = b.stats["s"][layer]
        assert st.sums.keys() == other.sums.keys()
        for field, t in st.sums.items():
            assert torch.equal(t, other.sums[field]), (layer, field)


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls the re-runs answered from the pass, per layer."""
    answered: dict[int, int] = {}
    real = BeforeBlock.replaying

    @contextmanager
    def replaying(self):
        with real(self):
            n = sum(len(c) for c in self.calls)
            yield self
        answered[id(self)] = n

    monkeypatch.setattr(BeforeBlock, "replaying", replaying)
    return answered


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS) + [f"hf:{t}" for t in TRANSFORMERS_FAMILIES])
def test_the_rerun_answered_from_the_pass_equals_the_full_rerun(family, counted, monkeypatch):
    torch.manual_seed(0)
    model = runnable(tiny_family_model(family[3:]) if family.startswith("hf:") else tiny_model(family, seed=2))
    adapter = get_adapter(model.config)
    vocab = model.get_input_embeddings().weight.shape[0]
    data = calib_set()
    data.input_ids = data.input_ids % vocab
    with torch.no_grad():
        got = _run(model, adapter, data)
    if adapter.block(model, adapter.moe_layers()[0]) is not adapter.decoder_layers(model)[adapter.moe_layers()[0]]:
        assert sum(counted.values()) > 0  # the replay answered calls (a layer that is its own block has none)

    @contextmanager
    def full(self):  # the reference: every re-run computed in full
        yield self

    monkeypatch.setattr(BeforeBlock, "replaying", full)
    with torch.no_grad():
        want = _run(model, adapter, data)
    _same(got, want)


def test_over_budget_a_layer_keeps_nothing_and_the_rerun_is_full(counted, monkeypatch):
    model = tiny_model("qwen3_moe", seed=4, num_hidden_layers=4)
    adapter = get_adapter(model.config)
    data = calib_set()
    with torch.no_grad():
        answered = _run(model, adapter, data)
    assert sum(counted.values()) > 0
    counted.clear()
    monkeypatch.setattr(BeforeBlock.__init__, "__defaults__", (1024,))  # max_bytes: one [B, S, H] is more
    with torch.no_grad():
        full = _run(model, adapter, data)
    assert sum(counted.values()) == 0
    _same(answered, full)


def test_a_layer_call_that_differs_in_the_rerun_is_an_error():
    """A child called in the re-run where another was recorded (a layer whose calls change) is not answered."""
    model = tiny_model("qwen3_moe", seed=4)
    layer = model.model.layers[1]
    rec = BeforeBlock(layer, layer.mlp)
    inputs = seeded_inputs(96, batch=1, seq_len=8, seed=1)
    with torch.no_grad():
        with rec.record():
            model(**inputs)
        assert rec.complete and [n for n, _ in rec.calls[0]] == ["input_layernorm", "self_attn",
                                                                  "post_attention_layernorm"]
        rec.calls[0][0], rec.calls[0][1] = rec.calls[0][1], rec.calls[0][0]
        with pytest.raises(RuntimeError, match="input_layernorm called where self_attn was recorded"), rec.replaying():
            model(**inputs)

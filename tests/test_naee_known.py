"""NAEE's precompute copies the outputs the calibration pass already computed for each token's routed experts
(`RoutedCollector.keep_slots` -> `BlockIO.routed` -> `expert_outputs(known=...)`) instead of computing them again.

Reference: the same precompute on the same cached layer without them (every candidate output by the model's own
experts code): the Gram G, cross terms A and ‖U‖² agree to float32 rounding, the search drops the same experts, and
fewer expert rows are computed. NAEE families of every candidate kind: local selection (Qwen3-MoE, Mixtral, OLMoE,
gpt-oss's top-k-then-softmax, Qwen2-MoE's shared expert) and open candidates (DeepSeek-V3 / GLM group limits)."""

from __future__ import annotations

import pytest
import torch

from moeprune.calibration.data import CalibSet
from moeprune.calibration.session import collect
from moeprune.models import get_adapter
from moeprune.pipeline.verify import seeded_inputs
from moeprune.select.naee_incremental import incremental_evaluator
from moeprune.select.naee_outputs import expert_outputs, keep_stride
from moeprune.select.reconstruction import search
from moeprune.tiny import tiny_model

FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "qwen2_moe", "deepseek_v3", "glm4_moe"]


def _both(model, adapter, layer, io, n_drop, max_tokens):
    """(with the recorded outputs, without them): each an ExpertOutputs and the search's dropped set."""
    assert len(io.routed) == len(io.inputs) > 0  # the collector recorded one call per batch
    runs = []
    for known in (io.routed, None):
        out = expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid, max_dropped=n_drop, known=known,
                             known_stride=io.routed_stride, max_tokens=max_tokens)
        groups = adapter.routing().n_group if adapter.routing().group_limited else 1
        dropped = search(incremental_evaluator(model, adapter, layer, out), adapter.num_experts, n_drop,
                         groups=groups, beam=4).dropped
        runs.append((out, dropped))
    return runs


@pytest.mark.parametrize("family,max_tokens", [(f, None) for f in FAMILIES] + [("qwen3_moe", 40), ("deepseek_v3", 40)])
def test_precompute_with_the_calibration_outputs_equals_it_without(family, max_tokens):
    """Every token kept, and (a token cap) every 3rd of the ~100 real tokens: the pass records those only."""
    model = tiny_model(family, seed=5)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=16, seed=7)
    data = CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)
    n_drop = 2
    seen = {}

    def decide(model, adapter, layer, stats, io):
        seen[layer] = _both(model, adapter, layer, io, n_drop, max_tokens)
        return []

    decide.routed_stride = lambda real: keep_stride(real, max_tokens or real)[0]
    collect(model, adapter, [data], decide=decide)
    assert sorted(seen) == adapter.moe_layers()
    for layer, ((got, got_drop), (ref, ref_drop)) in seen.items():
        assert got.known and not ref.known
        assert got.rows_computed < ref.rows_computed, layer  # the routed outputs were copied, not computed
        assert got.target_sq == pytest.approx(ref.target_sq, rel=1e-12)
        for name in ("gram", "cross"):
            for g, r in zip(getattr(got, name), getattr(ref, name), strict=True):
                assert g.shape == r.shape
                both = ~torch.isnan(r)  # unfilled entries are NaN in both
                assert torch.equal(both, ~torch.isnan(g)), (layer, name)
                scale = float(r[both].abs().max())
                assert float((g[both] - r[both]).abs().max()) <= 1e-5 * scale, (layer, name)
        assert got_drop == ref_drop, layer


def test_collector_records_only_when_asked_and_not_in_the_rerun():
    model = tiny_model("qwen3_moe", seed=5)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=16, seed=7)
    data = CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)
    lengths = {}

    def decide(model, adapter, layer, stats, io):
        lengths[layer] = len(io.routed)
        for idx, y in io.routed:  # [r, k] experts, [r, k, H] outputs of every 2nd real token
            real = int(data.attention_mask.sum())
            assert idx.shape == ((real + 1) // 2, adapter.top_k) and y.shape == (*idx.shape, 32)
        return [0]  # a drop: every layer is re-run (masked) before the next one is calibrated

    decide.routed_stride = lambda real: 2
    collect(model, adapter, [data], decide=decide)
    assert lengths and all(n == 1 for n in lengths.values()), lengths  # one batch of 3 sequences per layer

    def plain(model, adapter, layer, stats, io):
        lengths[layer] = len(io.routed)
        return []

    collect(model, adapter, [data], decide=plain)  # a decider that does not ask gets nothing recorded
    assert all(n == 0 for n in lengths.values()), lengths


def test_outputs_recorded_for_other_tokens_are_not_used():
    """Recorded for every 2nd real token, while the precompute keeps every token: nothing is copied."""
    model = tiny_model("qwen3_moe", seed=5)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=16, seed=7)
    data = CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)
    runs = []

    def decide(model, adapter, layer, stats, io):
        assert io.routed_stride == 2 and io.routed
        runs.append([expert_outputs(model, adapter, layer, io.inputs, io.outputs, io.valid, max_dropped=2,
                                    known=known, known_stride=io.routed_stride) for known in (io.routed, None)])
        return []

    decide.routed_stride = lambda real: 2
    collect(model, adapter, [data], decide=decide)
    assert runs
    for got, ref in runs:
        assert not got.known and got.rows_computed == ref.rows_computed
        assert all(torch.equal(g.nan_to_num(), r.nan_to_num()) for g, r in zip(got.gram, ref.gram, strict=True))


def test_the_naee_decider_reuses_them(monkeypatch):
    """End to end through `reconstruction_decider` (what `prune --method naee` runs): every MoE layer's precompute
    copied the pass's routed outputs, and the choices equal those of a run that records nothing."""
    import moeprune.select.progressive as progressive

    model = tiny_model("qwen3_moe", seed=5)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=16, seed=7)
    data = CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)
    real = progressive.expert_outputs
    used = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        used.append(bool(out.known))
        return out

    monkeypatch.setattr(progressive, "expert_outputs", spy)
    decide = progressive.reconstruction_decider(0.25, adapter.routing(), adapter.num_experts)
    got = collect(model, adapter, [data], decide=decide).dropped
    assert used == [True] * len(adapter.moe_layers())
    del decide.routed_stride  # the same decider recording nothing
    used.clear()
    assert collect(model, adapter, [data], decide=decide).dropped == got
    assert used == [False] * len(adapter.moe_layers())

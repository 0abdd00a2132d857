"""Non-uniform neuron widths: saved per layer, refused by stock `from_pretrained` with a message naming the
loader, restored exactly by `moeprune.load_model` (== the original with the removed neurons zeroed)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.api import apply_plan as apply_neuron_plan_to
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.models.summary import format_summary, summarize
from moeprune.pipeline.verify import logits_of, seeded_inputs, verify
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.surgery.neurons import mask_neurons
from moeprune.tiny import save_tiny

WIDTH = 48
CASES = {"qwen3_moe": {"moe_intermediate_size": WIDTH}, "gpt_oss": {"intermediate_size": WIDTH},
         "deepseek_v3": {"moe_intermediate_size": WIDTH}}


def _plan(adapter, seed: int) -> NeuronPlan:
    """First MoE layer: experts keep 1..16 neurons; the others 17..40 — different widths per expert and layer."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for i, layer in enumerate(adapter.moe_layers()):
        lo, hi = (1, 16) if i == 0 else (17, 40)
        kept[layer] = {}
        for j in range(adapter.num_experts):
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
            kept[layer][j] = sorted(torch.randperm(WIDTH, generator=g)[:n].tolist())
    return NeuronPlan(kept, WIDTH, method="manual", budget="global", model_type=adapter.model_type)


@pytest.mark.parametrize("family", sorted(CASES))
def test_nonuniform_export_round_trip(family, tmp_path):
    src = save_tiny(family, tmp_path / "src", seed=7, **CASES[family])
    original = load_model(src, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    plan = _plan(adapter, seed=1)
    applied = apply_neuron_plan_to(src, plan, tmp_path / "out")
    out = applied.out
    assert applied.report["loadable_by_stock_config"] is False and "moeprune.load_model" in applied.report["note"]
    widths = {int(k): v for k, v in applied.report["layer_widths"].items()}
    first, *rest = adapter.moe_layers()
    assert widths[first] == 16 and all(widths[layer] == 40 for layer in rest)
    with pytest.raises(ValueError, match="moeprune.load_model"):
        AutoModelForCausalLM.from_pretrained(out)  # never loads silently wrong
    pruned = moeprune.load_model(out, dtype="float32")
    p_adapter = get_adapter(pruned.config, model=pruned)
    for layer, w in widths.items():
        down = p_adapter.expert_roles(p_adapter.block(pruned, layer))["down"]  # [E, H, I_l]
        assert down.shape[-1] == w
    assert applied.report["weight_bytes_after"] < applied.report["weight_bytes_before"]
    inputs = seeded_inputs(96, 2, 20, seed=5)
    mask_neurons(original, adapter, plan)
    want = logits_of(original, inputs)
    got = logits_of(pruned, inputs)
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    assert verify(src, out, [plan]).passed
    text = format_summary(summarize(str(out)))
    assert "NON-UNIFORM" in text and str(widths) in text


def test_nonuniform_reference_differs_from_a_uniform_cut(tmp_path):
    """The round-trip check can fail: a checkpoint cut to the first 16 neurons everywhere gives other logits."""
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=7, moe_intermediate_size=WIDTH)
    original = load_model(src, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    plan = _plan(adapter, seed=2)
    out = apply_neuron_plan_to(src, plan, tmp_path / "out").out
    inputs = seeded_inputs(96, 2, 20, seed=6)
    got = logits_of(moeprune.load_model(out, dtype="float32"), inputs)
    other = NeuronPlan({L: {j: list(range(16)) for j in d} for L, d in plan.kept_neurons.items()}, WIDTH)
    mask_neurons(original, adapter, other)
    assert (got - logits_of(original, inputs)).abs().max().item() > 1e-3

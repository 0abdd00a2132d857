"""`stats/slots.py`: per-slot expert outputs from transformers' grouped_mm kernel steps, run on (token, expert)
pairs directly. The reference is each family's own experts module under its eager implementation (the per-expert
loop of the modeling file), called with one slot per row at weight 1; and the statistics of a whole calibration
pass on the fast path equal those of `collect(eager=True)`, which never enters `slot_outputs`."""

from __future__ import annotations

import pytest
import torch

from moeprune.calibration.data import CalibSet
from moeprune.calibration.session import collect
from moeprune.models import get_adapter
from moeprune.pipeline.verify import seeded_inputs
from moeprune.stats.slots import slot_outputs, uses_grouped_mm
from moeprune.tiny import tiny_model
from moeprune.tiny_families import NOT_BUILDABLE, moe_blocks, moe_model_types, tiny_family_model


def _buildable_families() -> list[str]:
    """Every buildable MoE family; the test checks each one whose experts module dispatches to transformers'
    grouped_mm kernel, and that the others' experts code is not that kernel."""
    return [mt for mt in moe_model_types() if mt not in NOT_BUILDABLE]


def _experts(model) -> list[torch.nn.Module]:
    return [experts for _, _, experts, _ in moe_blocks(model)]


def _both_ways(experts, g: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_outputs, the module's own eager code with one slot per row at weight 1) on 10 random tokens' routed
    pairs plus every expert on two probe tokens: [M, H] each."""
    E = experts.num_experts
    down = experts.down_proj  # [E, I, H] transposed, else [E, H, I]
    H = down.shape[-1] if experts.is_transposed else down.shape[-2]
    hidden = torch.randn(10, H, generator=g).to(dtype)  # [N, H]
    routed = torch.randint(0, E, (10, 2), generator=g)  # [N, k]
    token = torch.cat([torch.arange(10).repeat_interleave(2), torch.tensor([3, 7]).repeat_interleave(E)])
    expert = torch.cat([routed.reshape(-1), torch.arange(E).repeat(2)])  # routed pairs, then two probes
    with torch.no_grad():
        got = slot_outputs(experts, hidden, token, expert)  # [M, H]
        before = experts.config._experts_implementation
        experts.config._experts_implementation = "eager"
        try:
            want = experts(hidden[token], expert[:, None], torch.ones(token.shape[0], 1, dtype=dtype))  # [M, H]
        finally:
            experts.config._experts_implementation = before
    assert got.shape == want.shape == (token.shape[0], H)
    return got, want


@pytest.mark.parametrize("family", _buildable_families())
def test_slot_outputs_equal_the_eager_experts_one_slot_per_row(family):
    model = tiny_family_model(family, seed=4).eval()
    grouped = [e for e in _experts(model) if uses_grouped_mm(e)]
    g = torch.Generator().manual_seed(0)
    if not grouped:  # eager-only experts code (dbrx, llama4, longcat_flash, step3p7): the collector's other path
        for e in _experts(model):
            if hasattr(e, "has_gate") and e.config._experts_implementation == "grouped_mm":
                # a subclass overriding the decorated forward (Ergo: a per-expert norm around it): the kernel's
                # steps alone are not its output, so the fast path must not take it
                got, want = _both_ways(e, g)
                assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)
        return
    for experts in grouped:
        got, want = _both_ways(experts, g)
        scale = want.abs().max()
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(scale))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_bf16_slot_outputs_with_padded_groups_equal_the_eager_experts(family):
    """bf16 on the CPU: each expert's group of rows is rounded up to a multiple of 32 with zero rows
    (`io/kernel_cache.pad_rows`; gpt_oss brings biases, which the padded rows take too). Against the eager loop
    in bf16, no padding: equal to bf16 rounding."""
    model = tiny_family_model(family, seed=4).eval().to(torch.bfloat16)
    grouped = [e for e in _experts(model) if uses_grouped_mm(e)]
    assert grouped
    g = torch.Generator().manual_seed(0)
    for experts in grouped:
        got, want = _both_ways(experts, g, torch.bfloat16)
        scale = float(want.float().abs().max())
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=2e-2 * scale)


def test_only_the_grouped_mm_dispatch_takes_the_fast_path():
    model = tiny_model("qwen3_moe", seed=0)
    experts = _experts(model)[0]
    model.config._experts_implementation = "grouped_mm"
    assert uses_grouped_mm(experts)
    model.config._experts_implementation = "eager"
    assert not uses_grouped_mm(experts)
    model.config._experts_implementation = "grouped_mm"
    experts._is_expert_parallel = True
    assert not uses_grouped_mm(experts)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h", "muse_spark", "aria_text"])
def test_collect_on_the_fast_path_equals_the_eager_loop(family):
    """Every routed statistic and the probe sums of a padded batch: fast path == eager per-expert loop."""
    model = (tiny_model(family, seed=1) if family == "qwen3_moe" else tiny_family_model(family, seed=1)).eval()
    model.config.get_text_config()._experts_implementation = "grouped_mm"
    model.config._experts_implementation = "grouped_mm"
    adapter = get_adapter(model.config, model=model)
    assert any(uses_grouped_mm(e) for e in _experts(model))
    vocab = model.config.get_text_config().vocab_size
    x = seeded_inputs(vocab, batch=3, seq_len=40, seed=2)
    sets = [CalibSet("s", x["input_ids"], x["attention_mask"], "-", "-", 1, 1)]
    fast = collect(model, adapter, sets, probe_stride=7).stats["s"]
    slow = collect(model, adapter, sets, probe_stride=7, eager=True).stats["s"]
    assert set(fast) == set(slow) and fast
    for layer, st in fast.items():
        assert st.has_probes
        for name, v in st.sums.items():
            w = slow[layer].sums[name]
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6 * float(w.abs().max().clamp_min(1))), (layer, name)

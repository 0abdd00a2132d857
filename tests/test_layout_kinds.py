"""Expert layouts, shared-expert widths and special MoE blocks (issue 16): each mechanism against an independent
reference on the family's tiny model.

- shared-expert companion keys (`models/coupling.py`): the updated config, built on meta, keeps the shared experts'
  shapes; indivisible widths and families whose shared expert shares the routed width key are refused;
- `MoEAdapter.expert_glu` follows the experts module (MiniMax-M3 `_apply_gate`, gpt-oss interleaved, up-only):
  the canonical-roles computation equals the module's own forward;
- pre-scaled-input blocks (llama4, `stats/prescaled.py`): routed statistics equal a brute-force computation, and the
  instrumented forwards leave the block output unchanged;
- up-only experts (nemotron_h) are known to the adapter and refused by merging before any work; refused families.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeprune.errors import MoePruneError, UnsupportedLayout
from moeprune.models import get_adapter
from moeprune.models.coupling import companion_keys, companion_updates, routed_pattern
from moeprune.models.structure import build_meta, config_from_json
from moeprune.tiny_families import tiny_family_config, tiny_family_model

SHARED = {"afmoe": "num_shared_experts", "aria_text": "moe_num_shared_experts", "exaone_moe": "num_shared_experts",
          "hy_v3": "num_shared_experts", "ernie4_5_moe": "moe_num_shared_experts"}


def _shared_shapes(config) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_meta(config).state_dict().items() if "shared" in k}


@pytest.mark.parametrize("family", sorted(SHARED))
def test_companion_key_keeps_the_shared_experts(family):
    config = tiny_family_config(family)
    adapter = get_adapter(config)
    routed = routed_pattern(adapter.block_name, adapter.experts_name)
    coupled, keys = companion_keys(config, adapter.intermediate_key, routed)
    assert keys[:1] == (SHARED[family],) and coupled and all("shared" in n for n in coupled)
    old = adapter.expert_width
    new = 8
    updates = companion_updates(config, adapter.intermediate_key, new, routed)
    n = getattr(config.get_text_config(), SHARED[family])
    assert updates == {SHARED[family]: old * n // new}
    after = config.__class__.from_dict(config.to_dict())
    text = after.get_text_config()
    setattr(text, adapter.intermediate_key, new)
    for k, v in updates.items():
        setattr(text, k, v)
    assert _shared_shapes(after) == _shared_shapes(config)  # independent: the stock class built from the new config
    bad = next(d for d in range(2, old) if (old * n) % d)
    with pytest.raises(MoePruneError, match=f"a kept width of {bad} does not divide {old * n}"):
        companion_updates(config, adapter.intermediate_key, bad, routed)


def test_no_companion_when_the_shared_width_has_its_own_key():
    config = tiny_family_config("minimax_m3_vl_text")
    adapter = get_adapter(config)
    assert companion_updates(config, adapter.intermediate_key, 8,
                             routed_pattern(adapter.block_name, adapter.experts_name)) == {}


def test_shared_expert_on_the_routed_width_key_is_an_unsupported_layout():
    config = tiny_family_config("llama4_text")
    adapter = get_adapter(config)
    assert adapter.intermediate_key == "intermediate_size" and adapter.expert_width == 48
    with pytest.raises(UnsupportedLayout, match="shared_expert"):
        companion_updates(config, adapter.intermediate_key, 24, routed_pattern(adapter.block_name,
                                                                                adapter.experts_name))


def test_non_finite_floats_survive_the_config_round_trip():
    config = tiny_family_config("nemotron_h")
    back = config_from_json(config.to_json_string(use_diff=False), type(config))
    assert tuple(back.time_step_limit) == (0.0, float("inf"))


# ------------------------------------------------------------------ activations
@pytest.mark.parametrize("family", ["minimax_m3_vl_text", "gpt_oss", "nemotron_h", "qwen3_moe"])
def test_expert_glu_matches_the_experts_own_forward(family):
    model = tiny_family_model(family, seed=1)
    adapter = get_adapter(model.config)
    block = adapter.block(model, adapter.moe_layers()[0])
    experts = adapter.experts(block)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)  # non-zero biases, so a glu that drops them would be caught
    roles = adapter.expert_roles(block)
    glu = adapter.expert_glu(experts)
    x = torch.randn(5, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    for j in (0, adapter.num_experts - 1):
        b = {r: roles[r][j] if r in roles else None for r in ("gate_bias", "up_bias", "down_bias")}
        g = F.linear(x, roles["gate"][j], b["gate_bias"]) if "gate" in roles else None
        want = F.linear(glu(g, F.linear(x, roles["up"][j], b["up_bias"])), roles["down"][j], b["down_bias"])
        got = experts(x, torch.full((5, 1), j), torch.ones(5, 1))  # the module's own code, weight 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert want.abs().max() > 0


def test_up_only_experts_refuse_merging_early():
    from moeprune.stages.merge import MergeOptions, MergeStage

    adapter = get_adapter(tiny_family_config("nemotron_h"))
    assert adapter.gated_experts is False and get_adapter(tiny_family_config("qwen3_moe")).gated_experts
    with pytest.raises(UnsupportedLayout, match="up-only"):
        MergeStage().check(MergeOptions(method="msmoe", ratio=0.25), adapter)


# ------------------------------------------------------------------ pre-scaled input (llama4)
def _llama4():
    model = tiny_family_model("llama4_text", seed=1)
    adapter = get_adapter(model.config)
    layer = adapter.moe_layers()[0]
    block = adapter.block(model, layer)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return model, adapter, block, x


def _brute(block, adapter, x):
    """Per token: logits, top-k experts, s = sigmoid(top-k logits), o_e = f_e(s·x) from the raw weights."""
    xt = x.reshape(-1, x.shape[-1])  # [T, H]
    logits = F.linear(xt, block.router.weight)  # [T, E]
    top, idx = logits.topk(adapter.top_k, dim=-1)  # [T, k]
    s = torch.sigmoid(top)  # [T, k]
    gu, down = block.experts.gate_up_proj, block.experts.down_proj  # [E, H, 2I], [E, I, H]
    act = block.experts.act_fn
    o = torch.zeros(*idx.shape, xt.shape[-1], dtype=torch.float64)
    for t in range(xt.shape[0]):
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            gate, up = ((s[t, slot] * xt[t]) @ gu[e]).chunk(2)
            o[t, slot] = ((act(gate) * up) @ down[e]).double()
    return logits, idx, s, o


@torch.no_grad()
def test_prescaled_routed_statistics_equal_brute_force():
    from moeprune.models.structural import StructuralAdapter
    from moeprune.stats.prescaled import is_prescaled
    from moeprune.stats.routed import RoutedCollector, RoutedStats

    model, adapter, block, x = _llama4()
    assert isinstance(adapter, StructuralAdapter) and is_prescaled(block.experts)
    want_out = block(x)[0]
    stats = RoutedStats(adapter.num_experts)
    col = RoutedCollector(block.experts, stats, block.router, adapter.routing().kind, block=block,
                          top_k=adapter.top_k, logits_at=adapter.router_logits_at)
    with col:
        got_out = block(x)[0]
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)  # the block's own computation, untouched
    logits, idx, s, o = _brute(block, adapter, x)
    E = adapter.num_experts
    count, gate_sum, gnorm, norm = (torch.zeros(E, dtype=torch.float64) for _ in range(4))
    for t in range(idx.shape[0]):
        for slot in range(idx.shape[1]):
            e, g, on = int(idx[t, slot]), float(s[t, slot]), float(o[t, slot].norm())
            count[e] += 1
            gate_sum[e] += g
            gnorm[e] += on  # g·‖f‖ = ‖o‖: the real contribution
            norm[e] += on / g
    sums = stats.sums
    assert count.sum() == idx.numel() and torch.equal(sums["count"], count)
    torch.testing.assert_close(sums["gate_sum"], gate_sum, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sums["gate_norm_sum"], gnorm, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(sums["norm_sum"], norm, rtol=1e-5, atol=1e-9)
    p = torch.sigmoid(logits.double())
    torch.testing.assert_close(sums["prob_sum"], (p / p.sum(-1, keepdim=True)).sum(0), rtol=1e-6, atol=1e-9)
    assert gnorm.sum() > 0


@torch.no_grad()
def test_prescaled_probes_are_every_expert_at_weight_one():
    from moeprune.stats.routed import RoutedCollector, RoutedStats

    model, adapter, block, x = _llama4()
    stats = RoutedStats(adapter.num_experts)
    col = RoutedCollector(block.experts, stats, block.router, adapter.routing().kind, block=block,
                          top_k=adapter.top_k, logits_at=adapter.router_logits_at)
    col.probe = torch.zeros(14, dtype=torch.bool)
    col.probe[[0, 5]] = True
    with col:
        block(x)
    xt = x.reshape(-1, x.shape[-1])[[0, 5]]  # [2, H]
    gu, down, act = block.experts.gate_up_proj, block.experts.down_proj, block.experts.act_fn
    want = torch.stack([(act((xt @ gu[e]).chunk(2, -1)[0]) * (xt @ gu[e]).chunk(2, -1)[1]) @ down[e]
                        for e in range(adapter.num_experts)]).sum(1).double()  # [E, H]
    torch.testing.assert_close(stats.sums["out_sum"], want, rtol=1e-5, atol=1e-7)
    assert float(stats.sums["probe_tokens"]) == 2


def test_prescaled_neuron_statistics_equal_brute_force():
    from moeprune.stats.neurons import NeuronCollector

    model, adapter, block, x = _llama4()
    layer = adapter.moe_layers()[0]
    with torch.no_grad():
        want_out = block(x)[0]
        with NeuronCollector(model, adapter, layers=[layer]) as col:
            got_out = block(x)[0]
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    _, idx, s, _ = _brute(block, adapter, x)
    xt = x.reshape(-1, x.shape[-1])
    gu, act = block.experts.gate_up_proj, block.experts.act_fn
    E, inter = adapter.num_experts, adapter.expert_width
    act_sq = torch.zeros(E, inter, dtype=torch.float64)
    for t in range(idx.shape[0]):
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            gate, up = ((s[t, slot] * xt[t]) @ gu[e]).chunk(2)
            act_sq[e] += (act(gate) * up).double().square()
    stats = col.stats[layer].sums
    torch.testing.assert_close(stats["act_sq"], act_sq, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats["gact_sq"], act_sq, rtol=1e-5, atol=1e-9)  # the scaling is inside h
    assert torch.equal(stats["count"], torch.bincount(idx.reshape(-1), minlength=E).double())


# ------------------------------------------------------------------ refused families
@pytest.mark.parametrize(("family", "reason"), [("jetmoe", "num_local_experts")])
def test_refused_families_say_why(family, reason):
    from transformers import AutoConfig

    with pytest.raises(MoePruneError, match=reason):
        get_adapter(AutoConfig.for_model(family))


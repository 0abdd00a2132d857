"""Routed statistics and the calibrated criteria against a brute-force reference: one whole-model forward
records the routing each MoE block really applied, every expert is evaluated on every token by hand from its
weights, and each formula is applied directly. The statistics come from the layer-by-layer engine with padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeprune.calibration.engine import capture, run_layers
from moeprune.criteria import CRITERIA
from moeprune.io.verify import seeded_inputs
from moeprune.models import get_adapter
from moeprune.stats import RoutedCollector, RoutedStats
from moeprune.tiny import tiny_model

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"]


def expert_outputs(model, adapter, layer: int, x: torch.Tensor) -> torch.Tensor:
    """f_j(x) for every expert j and token: [E, T, H], straight from the weights (no model code)."""
    experts = adapter.experts(adapter.block(model, layer))
    r = adapter.expert_roles(adapter.block(model, layer))
    gate = torch.einsum("th,eih->eti", x, r["gate"]) + (r["gate_bias"][:, None] if "gate_bias" in r else 0)
    up = torch.einsum("th,eih->eti", x, r["up"]) + (r["up_bias"][:, None] if "up_bias" in r else 0)
    if adapter.family == "gpt_oss":  # clamp, gate·σ(α·gate), (up + 1)
        gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        act = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    else:
        act = F.silu(gate) * up
    out = torch.einsum("eti,ehi->eth", act, r["down"])
    return out + (r["down_bias"][:, None] if "down_bias" in r else 0)


def brute_force(model, adapter, inputs):
    routed = {}
    hooks = [adapter.experts(adapter.block(model, layer)).register_forward_pre_hook(
        lambda m, a, layer=layer: routed.__setitem__(layer, (a[0].clone(), a[1].clone(), a[2].clone())))
        for layer in adapter.moe_layers()]
    with torch.no_grad():
        model(**inputs, use_cache=False)
    for h in hooks:
        h.remove()
    valid = inputs["attention_mask"].reshape(-1).bool()
    want = {}
    for layer, (x, idx, w) in routed.items():
        with torch.no_grad():
            f = expert_outputs(model, adapter, layer, x).double()  # [E, T, H]
        E = f.shape[0]
        count, gsum, nsum, sqsum, gnsum, mx = (torch.zeros(E, dtype=torch.float64) for _ in range(6))
        for t in range(x.shape[0]):
            if not valid[t]:
                continue
            for slot in range(idx.shape[1]):
                j, g = int(idx[t, slot]), float(w[t, slot])
                n = float(f[j, t].norm())
                count[j] += 1
                gsum[j] += g
                nsum[j] += n
                sqsum[j] += n * n
                gnsum[j] += g * n
                mx[j] = max(mx[j], float(f[j, t].abs().max()))
        safe = count.clamp_min(1)
        want[layer] = {"frequency": count, "soft_frequency": gsum, "ean_sum": nsum, "ean_mean": nsum / safe,
                       "msan": sqsum / safe, "reap": gnsum / safe, "max_activation": mx}
    return want


def collect(model, adapter, inputs):
    stats = {layer: RoutedStats(adapter.num_experts) for layer in adapter.moe_layers()}
    batch = capture(model, adapter, inputs["input_ids"], inputs["attention_mask"])

    def on_layer(i, layer_module):
        if i not in stats:
            return None
        collector = RoutedCollector(adapter.experts(adapter.block(model, i)), stats[i])
        collector.valid = inputs["attention_mask"].reshape(-1).bool()
        collector.__enter__()
        return lambda: collector.__exit__(None, None, None)

    for _ in run_layers(model, adapter, [batch], on_layer=on_layer):
        pass
    return stats


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_criteria_match_brute_force(family):
    model = tiny_model(family, seed=2)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=20, seed=4)
    want = brute_force(model, adapter, inputs)
    got = collect(model, adapter, inputs)
    for layer, formulas in want.items():
        assert formulas["frequency"].sum() == inputs["attention_mask"].sum() * adapter.top_k
        for name, expected in formulas.items():
            score = CRITERIA.get(name).fn(got[layer])
            assert torch.allclose(score, expected, rtol=1e-4, atol=1e-6), (family, layer, name, score, expected)


def test_padding_changes_nothing():
    """Stats of a padded batch equal the stats of the same real tokens without the padded row's padding."""
    model = tiny_model("qwen3_moe", seed=0)
    adapter = get_adapter(model.config)
    full = seeded_inputs(96, batch=2, seq_len=16, seed=9)  # row 1 left-padded by 4
    row = {"input_ids": full["input_ids"][1:, 4:], "attention_mask": full["attention_mask"][1:, 4:]}
    first = {"input_ids": full["input_ids"][:1], "attention_mask": full["attention_mask"][:1]}
    both = collect(model, adapter, full)
    parts = [collect(model, adapter, row), collect(model, adapter, first)]
    for layer in adapter.moe_layers():
        merged = parts[0][layer].merge(parts[1][layer])
        for name in ("count", "gate_sum", "norm_sum", "max_abs"):
            assert torch.allclose(both[layer].sums[name], merged.sums[name], rtol=1e-4), (layer, name)

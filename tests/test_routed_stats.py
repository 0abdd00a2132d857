"""Routed statistics and the calibrated criteria against a brute-force reference: one whole-model forward
records the routing each MoE block really applied, every expert is evaluated on every token by hand from its
weights, and each formula is applied directly. The statistics come from the layer-by-layer engine with padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeprune.calibration import session
from moeprune.calibration.data import CalibSet
from moeprune.criteria import CRITERIA
from moeprune.models import get_adapter
from moeprune.pipeline.verify import seeded_inputs
from moeprune.stats.routed import FIELDS, GROUPING_FIELDS, default_probe_stride
from moeprune.tiny import FAMILY_CONFIGS, tiny_model

PROBE_STRIDE = 8  # several probe tokens per row of 20 (the default, ⌈8E/k⌉ = 32, would give one)


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
    """One whole-model forward records each MoE block's input, its routing and its router logits; every expert is
    then evaluated on every token from its weights and each formula is applied token by token."""
    routed, logits = {}, {}
    hooks = []
    for layer in adapter.moe_layers():
        block = adapter.block(model, layer)
        hooks.append(adapter.experts(block).register_forward_pre_hook(
            lambda m, a, layer=layer: routed.__setitem__(layer, (a[0].clone(), a[1].clone(), a[2].clone()))))
        hooks.append(adapter.router(block).register_forward_hook(
            lambda m, a, o, layer=layer: logits.__setitem__(layer, o[0].detach().reshape(-1, adapter.num_experts))))
    with torch.no_grad():
        model(**inputs, use_cache=False)
    for h in hooks:
        h.remove()
    valid = inputs["attention_mask"].reshape(-1).bool()
    mask = inputs["attention_mask"]
    stride = PROBE_STRIDE
    probes = []  # flattened indices of every row's 0th, stride-th, 2·stride-th ... real token
    for b in range(mask.shape[0]):
        real = [s for s in range(mask.shape[1]) if mask[b, s]]
        probes += [b * mask.shape[1] + s for n, s in enumerate(real) if n % stride == 0]
    sigmoid = adapter.routing().kind == "sigmoid_grouped"
    want = {}
    for layer, (x, idx, w) in routed.items():
        with torch.no_grad():
            f = expert_outputs(model, adapter, layer, x).double()  # [E, T, H]
        E = f.shape[0]
        z = logits[layer].double()  # [T, E]
        p = torch.sigmoid(z) / torch.sigmoid(z).sum(-1, keepdim=True) if sigmoid else torch.softmax(z, -1)
        count, gsum, nsum, sqsum, gnsum, mx, easy, tk, t1 = (torch.zeros(E, dtype=torch.float64) for _ in range(9))
        coact = torch.zeros(E, E, dtype=torch.float64)
        zv = z * valid[:, None]
        fp = f[:, probes]  # [E, P, H]
        grouping = {"logit_gram": zv.T @ zv, "out_sum": fp.sum(1), "probe_tokens": torch.tensor([len(probes)]),
                    "out_gram": torch.stack([torch.stack([(fp[i] * fp[j]).sum() for j in range(E)])
                                             for i in range(E)])}
        tokens = 0
        for t in range(x.shape[0]):
            if not valid[t]:
                continue
            tokens += 1
            chosen = [int(j) for j in idx[t]]
            r = sum(float(w[t, s]) * f[chosen[s], t] for s in range(len(chosen)))  # routed output [H]
            h = x[t].double()
            novelty = max(0.0, 1 - float(torch.dot(h, h + r) / (h.norm() * (h + r).norm())))
            best = int(p[t].argmax())
            t1[best] += float(p[t, best])
            for slot, j in enumerate(chosen):
                g, n = float(w[t, slot]), float(f[j, t].norm())
                count[j] += 1
                gsum[j] += g
                nsum[j] += n
                sqsum[j] += n * n
                gnsum[j] += g * n
                easy[j] += g * n * novelty
                tk[j] += float(p[t, j])
                mx[j] = max(mx[j], float(f[j, t].abs().max()))
                for i in chosen:
                    coact[i, j] += 1
        safe = count.clamp_min(1)
        want[layer] = ({"frequency": count, "soft_frequency": gsum, "ean_sum": nsum, "ean_mean": nsum / safe,
                        "msan": sqsum / safe, "reap": gnsum / safe, "max_activation": mx, "easy_ep": easy,
                        "tcess": tk / tokens, "tcess_top1": t1 / tokens}, coact, grouping)
    return want


def collect(model, adapter, inputs, batch_size=8, name="s", eager=False):
    """The real engine path: layer by layer, batches of `batch_size` rows, collectors on every MoE layer."""
    calib = CalibSet(name, inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)
    return session.collect(model, adapter, [calib], batch_size=batch_size,
                           probe_stride=PROBE_STRIDE, eager=eager).stats[name]


@pytest.mark.parametrize("eager", [False, True], ids=["model-impl", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_routed_criteria_match_brute_force(family, eager):
    """Either experts implementation (the model's configured kernel, or the forced eager loop) gives the sums."""
    model = tiny_model(family, seed=2)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=20, seed=4)
    want = brute_force(model, adapter, inputs)
    got = collect(model, adapter, inputs, batch_size=2, eager=eager)  # 2 batches: sums must carry across them
    calibrated = [name for name, c in CRITERIA.items() if c.needs == "calibration"]
    for layer, (formulas, coact, grouping) in want.items():
        assert formulas["frequency"].sum() == inputs["attention_mask"].sum() * adapter.top_k
        assert sorted(formulas) == sorted(calibrated), "a calibrated criterion has no brute-force reference"
        for name, expected in formulas.items():
            assert expected.abs().sum() > 0, (family, name)  # a formula that is all zero proves nothing
            score = CRITERIA.get(name).fn(got[layer])
            assert torch.allclose(score, expected, rtol=1e-4, atol=1e-6), (family, layer, name, score, expected)
        assert torch.equal(got[layer].sums["coact"], coact), (family, layer)
        assert grouping["probe_tokens"].item() > inputs["input_ids"].shape[0]  # some row has 2 probes
        for name, expected in grouping.items():
            assert torch.allclose(got[layer].sums[name], expected.double(), rtol=1e-4, atol=1e-5), (family, name)
        assert got[layer].sums["tokens"].item() == inputs["attention_mask"].sum()


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
        for name in FIELDS:
            ref = both[layer].sums[name]
            atol = 1e-6 * float(ref.abs().max()) if name in GROUPING_FIELDS else 1e-9  # float32 sums of both signs
            assert torch.allclose(ref, merged.sums[name], rtol=1e-4, atol=atol), (layer, name)


def test_merge_equals_concatenated_data():
    """Stats of A merged with stats of B == stats of A and B run together (batch boundaries differ too)."""
    model = tiny_model("deepseek_v3", seed=1)
    adapter = get_adapter(model.config)
    a = seeded_inputs(96, batch=3, seq_len=12, seed=1)
    b = seeded_inputs(96, batch=2, seq_len=12, seed=2)
    together = {k: torch.cat([a[k], b[k]]) for k in a}
    sa, sb, sab = collect(model, adapter, a, 2), collect(model, adapter, b, 2), collect(model, adapter, together, 5)
    for layer in adapter.moe_layers():
        merged = sa[layer].merge(sb[layer])
        assert not torch.equal(sa[layer].sums["count"], sab[layer].sums["count"])
        for name in FIELDS:  # logits/probe outputs: float32 sums of both signs, tolerance relative to the scale
            ref = sab[layer].sums[name]
            atol = 1e-6 * float(ref.abs().max()) if name in GROUPING_FIELDS else 1e-9
            assert torch.allclose(merged.sums[name], sab[layer].sums[name], rtol=1e-6, atol=atol), (layer, name)


def test_probe_tokens_by_hand():
    """Probe tokens: every stride-th real token of a row counted from its first real token (padding skipped);
    the default stride ⌈8E/k⌉ makes probing an eighth of the routed expert rows."""
    from moeprune.stats.routed import probe_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert probe_mask(mask, 2).view(2, 5).tolist() == [[False, False, True, False, True],
                                                       [True, False, True, False, True]]
    assert probe_mask(mask, 10).nonzero().squeeze(1).tolist() == [2, 5]
    assert default_probe_stride(8, 2) == 32 and default_probe_stride(128, 8) == 128
    assert default_probe_stride(3, 8) == 3


def test_sums_move_as_one_buffer_and_come_back_as_separate_tensors():
    """`RoutedStats.to` moves every field through one buffer (one host-device copy per layer on a GPU):
    the values are the fields' own, each field is its own tensor (safetensors refuses shared storage)."""
    from moeprune.stats.routed import RoutedStats, moved_together

    st = RoutedStats(6, hidden=5)
    gen = torch.Generator().manual_seed(0)
    originals = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in st.sums.items()}
    moved = moved_together(originals, "cpu")
    assert list(moved) == list(originals)
    for k, v in originals.items():
        assert moved[k].shape == v.shape and torch.equal(moved[k], v), k
    storages = {m.untyped_storage().data_ptr() for m in moved.values()}
    assert len(storages) == len(moved)  # no field is a view of the buffer
    st.sums = originals
    assert st.to("meta").sums["out_sum"].is_meta and st.sums["out_sum"].shape == (6, 5)

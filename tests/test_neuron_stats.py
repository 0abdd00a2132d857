"""Neuron statistics (CAMERA-P, HEAPr) against brute force on tiny models.

- the instrumented experts forward leaves every family's logits unchanged;
- CAMERA-P sums/maxima equal a dense recomputation from the raw weights and the captured routing;
- HEAPr's score equals its definition with the output-space Fisher M_j = (1/N_j) Σ g gᵀ formed explicitly,
  g = ∂L/∂y obtained with zero probes added to every expert output (no use of the collector's ∂L/∂h trick).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeprune.calibration.data import CalibSet
from moeprune.criteria.neurons import neuron_scores
from moeprune.models import get_adapter
from moeprune.stats.neurons import NeuronCollector, collect_neuron_stats, summed_nll
from moeprune.tiny import FAMILY_CONFIGS, tiny_model

FAMILIES = sorted(FAMILY_CONFIGS)


def _batch(seed: int = 0, B: int = 3, S: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -4:] = 0  # right padding: never counted
    return ids, mask


def _set(ids, mask) -> CalibSet:
    return CalibSet("t", ids, mask, sha256="0" * 64, source="test", documents=1, stream_tokens=int(mask.sum()))


@pytest.mark.parametrize("family", FAMILIES)
def test_instrumented_forward_keeps_logits(family):
    model = tiny_model(family, seed=3).eval()
    adapter = get_adapter(model.config, model=model)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with NeuronCollector(model, adapter) as col:
            col.valid = mask.reshape(-1).bool()
            got = model(input_ids=ids, attention_mask=mask).logits
    assert (got - ref).abs().max().item() < 1e-5
    assert all(s.sums["count"].sum() > 0 for s in col.stats.values())


def _captured_routing(model, adapter, ids, mask):
    """{layer: (hidden [T, H], top_k_index [T, k], top_k_weights [T, k])} seen by the stock experts modules."""
    seen, hooks = {}, []
    for layer in adapter.moe_layers():
        experts = adapter.experts(adapter.block(model, layer))
        hooks.append(experts.register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(layer, tuple(a.detach() for a in args[:3]))))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return seen


def test_camera_sums_against_dense_recomputation():
    model = tiny_model("qwen3_moe", seed=4).eval()
    adapter = get_adapter(model.config, model=model)
    ids, mask = _batch(1)
    stats = collect_neuron_stats(model, adapter, [_set(ids, mask)], gradients=False, batch_size=2)
    routing = _captured_routing(model, adapter, ids, mask)
    valid = mask.reshape(-1).double()  # [T]
    for layer, (x, idx, w) in routing.items():
        experts = adapter.experts(adapter.block(model, layer))
        E, I = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[1] // 2
        for j in range(E):
            gu = x @ experts.gate_up_proj[j].T  # [T, 2I]  every token, routed or not
            h = (F.silu(gu[:, :I]) * gu[:, I:]).double()  # [T, I]
            gate = (w * (idx == j)).sum(dim=1).double() * valid  # ĝ_j(t), 0 when not routed or padding
            routed = ((idx == j).any(dim=1).double() * valid)  # [T]
            s = stats[layer].sums
            assert s["count"][j].item() == routed.sum().item()
            torch.testing.assert_close(s["act_sq"][j], (h.square() * routed[:, None]).sum(0), rtol=1e-5, atol=1e-9)
            gh2 = (gate[:, None] * h).square()
            torch.testing.assert_close(s["gact_sq"][j], gh2.sum(0), rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(s["gact_max"][j], gh2.amax(0), rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(s["down_sq"][j], experts.down_proj[j].double().square().sum(0))
    cam = neuron_scores("camera", stats, rho=0.9)
    s = stats[1].sums
    torch.testing.assert_close(cam[1], s["down_sq"] * (0.1 * s["gact_sq"] + 0.9 * s["gact_max"]))


def _probe_gradients(model, adapter, ids, mask):
    """Brute force: run the model with a zero probe δ added to every expert output y (before the routing
    weight), autograd.grad of the summed NLL w.r.t. the probes -> {layer: {j: (h [n, I], g [n, H], valid [n])}}."""
    probes, acts = {}, {}
    patched = []
    valid = mask.reshape(-1)
    for layer in adapter.moe_layers():
        experts = adapter.experts(adapter.block(model, layer))

        def forward(hidden, idx, w, layer=layer, experts=experts):
            out = torch.zeros_like(hidden)
            I = experts.gate_up_proj.shape[1] // 2
            for j in range(experts.gate_up_proj.shape[0]):
                tok, slot = torch.where(idx == j)
                if tok.numel() == 0:
                    continue
                gu = hidden[tok] @ experts.gate_up_proj[j].T
                h = F.silu(gu[:, :I]) * gu[:, I:]
                delta = torch.zeros(tok.numel(), hidden.shape[1], dtype=hidden.dtype, requires_grad=True)
                probes[(layer, j)] = delta
                acts[(layer, j)] = (h.detach(), valid[tok])
                y = h @ experts.down_proj[j].T + delta
                out.index_add_(0, tok, y * w[tok, slot, None])
            return out

        experts.forward = forward
        patched.append(experts)
    emb = model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda m, a, o: o.requires_grad_(True))
    try:
        loss = summed_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        keys = list(probes)
        grads = torch.autograd.grad(loss, [probes[k] for k in keys])
    finally:
        hook.remove()
        for e in patched:
            del e.forward
    return {k: (*acts[k], g) for k, g in zip(keys, grads, strict=True)}


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float32, 1e-4, 0.0), (torch.bfloat16, 2e-2, 1e-3)])
def test_heapr_score_against_explicit_fisher(dtype, rtol, atol):
    """The collector's HEAPr scores against the explicit Fisher of the brute force above, run on the same model.
    bf16 on the CPU: the collector rounds each expert's rows up to a multiple of 32 (`io/kernel_cache.pad_rows`,
    zero rows sliced off) and the brute force does not (the tiny model hands each expert < 32 tokens, so every
    call is padded): equal to bf16 rounding. atol is relative to the largest expected score."""
    model = tiny_model("qwen3_moe", seed=5).eval().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = get_adapter(model.config, model=model)
    ids, mask = _batch(2)
    stats = collect_neuron_stats(model, adapter, [_set(ids, mask)], gradients=True, batch_size=8)
    scores = neuron_scores("heapr", stats)
    brute = _probe_gradients(model, adapter, ids, mask)
    checked = 0
    for (layer, j), (h, v, g) in brute.items():
        keep = v.bool()
        if keep.sum() == 0:
            continue
        h, g = h[keep].double(), g[keep].double()  # [N, I], [N, H]
        N = h.shape[0]
        M = g.T @ g / N  # [H, H] output-space Fisher of expert j
        W = adapter.experts(adapter.block(model, layer)).down_proj[j].double()  # [H, I], column k = w_k
        expected = h.square().mean(0) * torch.einsum("hk,hg,gk->k", W, M, W)  # mean x_k² · w_kᵀ M w_k
        torch.testing.assert_close(scores[layer][j], expected, rtol=rtol, atol=max(1e-12, atol * float(expected.max())))
        checked += 1
    assert checked >= 8
    assert all(p.grad is None for p in model.parameters())  # statistics never touch parameter gradients


def test_pad_rows_rounds_up_with_zero_rows_only_where_onednn_serves():
    from moeprune.io.kernel_cache import ROW_BUCKET, pad_rows

    x = torch.randn(37, 8).to(torch.bfloat16)
    p = pad_rows(x)
    assert p.shape == (2 * ROW_BUCKET, 8) and torch.equal(p[:37], x) and not p[37:].any()
    assert pad_rows(x[:ROW_BUCKET]) is not None and pad_rows(x[:ROW_BUCKET]).shape[0] == ROW_BUCKET
    assert pad_rows(x.float()).shape[0] == 37  # float32 on the CPU: not oneDNN's, unchanged
    assert pad_rows(torch.empty(37, 8, dtype=torch.bfloat16, device="meta")).shape[0] == 37  # not on the CPU


def test_heapr_without_gradients_is_refused():
    from moeprune.errors import MoePruneError

    model = tiny_model("qwen3_moe", seed=5).eval()
    adapter = get_adapter(model.config, model=model)
    ids, mask = _batch()
    stats = collect_neuron_stats(model, adapter, [_set(ids, mask)], gradients=False)
    with pytest.raises(MoePruneError, match="gradient statistics"):
        neuron_scores("heapr", stats)
    with pytest.raises(MoePruneError, match="rho"):
        neuron_scores("camera", stats, rho=1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_column_sq_equals_the_float64_sum(dtype):
    """down_sq is summed one expert at a time through a reused buffer; it equals Σ_h down² computed one column at
    a time in Python floats, for every expert (the buffer is rewritten, not accumulated into)."""
    from moeprune.stats import neurons

    down = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(3)).to(dtype)  # [E, H, I]
    want = torch.tensor([[sum(float(down[e, h, i]) ** 2 for h in range(7)) for i in range(3)] for e in range(5)],
                        dtype=torch.float64)
    got = neurons.column_sq(down)
    assert got.dtype == torch.float64 and got.shape == (5, 3)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    strided = neurons.column_sq(down.transpose(1, 2).contiguous().transpose(1, 2))  # a non-contiguous view
    assert torch.equal(strided, got)

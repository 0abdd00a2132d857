"""Surgery in place on the lazy loader's own buffers (`models/scratch.py`): the same values as a fresh copy, in
the same storage only where the loader allowed it, every fused style, and only for the buffers of the layer
being visited. References are built by plain loops over rows and neurons, not by the code checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeprune.io.lazy import load_lazy
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.models.fused_styles import STYLES
from moeprune.models.scratch import is_scratch, keep_rows, rebuild_rows, scratch
from moeprune.select.plan import PrunePlan
from moeprune.surgery.in_memory import prune_layer
from moeprune.tiny import save_tiny

E, I, H, K = 6, 8, 5, 5  # experts, neurons, hidden, neurons kept


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the tensors and kept neurons drawn below


def _rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return torch.stack([t[i].clone() for i in idx])


@pytest.mark.parametrize("idx", [[0, 2, 3, 5], [1, 2, 4], [0, 1, 2, 3, 4, 5], [5]])
def test_keep_rows_in_place_on_scratch_only(idx):
    t = torch.randn(E, I, H)
    want = _rows(t, idx)
    base = t.data_ptr()
    outside = keep_rows(t, torch.tensor(idx))
    assert torch.equal(outside, want) and outside.data_ptr() != base and torch.equal(_rows(t, idx), want)
    with scratch([t]):
        inside = keep_rows(t, torch.tensor(idx))
    assert torch.equal(inside, want)
    assert inside.data_ptr() == base  # the kept rows now sit at the front of t's own buffer
    assert inside.is_contiguous() and inside.shape == (len(idx), I, H)


def test_keep_rows_out_of_order_is_a_copy_even_on_scratch():
    """Rows out of ascending order could overwrite a row before it is read: a new tensor, t untouched."""
    t = torch.randn(E, I, H)
    before = t.clone()
    with scratch([t]):
        got = keep_rows(t, torch.tensor([3, 1, 4]))
    assert torch.equal(got, _rows(before, [3, 1, 4])) and got.data_ptr() != t.data_ptr()
    assert torch.equal(t, before)


def test_rebuild_rows_smaller_rows_in_place():
    """Each row shrinks (a neuron gather): row e lands at flat [e·S', (e+1)·S') of t's buffer."""
    t = torch.randn(E, I, H)
    idx = [sorted(torch.randperm(I)[:K].tolist()) for _ in range(E)]
    want = torch.stack([torch.stack([t[e, k].clone() for k in idx[e]]) for e in range(E)])
    with scratch([t]):
        got = rebuild_rows(t, E, lambda e: t[e].index_select(0, torch.tensor(idx[e])))
    assert torch.equal(got, want) and got.data_ptr() == t.data_ptr()


def test_scratch_is_scoped():
    t, other = torch.randn(3, 4), torch.randn(3, 4)
    with scratch([t]):
        assert is_scratch(t) and is_scratch(t[1:]) and not is_scratch(other)
        with scratch([other]):
            assert is_scratch(t) and is_scratch(other)
        assert not is_scratch(other)
    assert not is_scratch(t)


# ------------------------------------------------------------------ fused styles, neuron removal


def _experts(style, bias: bool, extra: int = 0) -> nn.Module:
    """A fused experts module in `style`'s stored layout, with E + extra rows in the input projection."""
    width = 2 * I if style.gated else I
    m = nn.Module()
    shape_in = (E + extra, H, width) if style.transposed else (E + extra, width, H)
    setattr(m, style.in_name, nn.Parameter(torch.randn(shape_in)))
    m.down_proj = nn.Parameter(torch.randn((E, I, H) if style.transposed else (E, H, I)))
    if bias:
        setattr(m, style.in_bias_name, nn.Parameter(torch.randn(E + extra, width)))
        m.down_proj_bias = nn.Parameter(torch.randn(E, H))
    return m


def _expected_in(style, stored: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """The input projection keeping neurons rows[e], by loops over the layout the fused_styles docstring gives:
    the 2I axis is [gate_0 .. gate_{I-1}, up_0 .. up_{I-1}] (concatenated) or [gate_0, up_0, gate_1, ...]
    (interleaved), or the I up rows alone (up-only); transposed styles hold it on the last axis."""
    axis = 2 if (style.transposed and stored.dim() == 3) else 1
    out = []
    for e, keep in enumerate(rows):
        if not style.gated:
            pick = list(keep)
        elif style.interleaved:
            pick = [p for k in keep for p in (2 * k, 2 * k + 1)]
        else:
            pick = list(keep) + [I + k for k in keep]
        out.append(torch.stack([stored[e].select(axis - 1, p).clone() for p in pick], dim=axis - 1))
    return torch.stack(out)


@pytest.mark.parametrize("on_scratch", [True, False], ids=["scratch", "fresh"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("style_name", sorted(STYLES))
def test_take_neurons_every_style(style_name, bias, on_scratch):
    style = STYLES[style_name]
    extra = 2 if style_name == "concat" else 0  # weightless extra router classes keep their first K neurons
    m = _experts(style, bias, extra)
    idx = [sorted(torch.randperm(I)[:K].tolist()) for _ in range(E)]
    rows = idx + [list(range(K))] * extra
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    want = {style.in_name: _expected_in(style, before[style.in_name], rows)}
    if bias:
        want[style.in_bias_name] = _expected_in(style, before[style.in_bias_name], rows)
        want["down_proj_bias"] = before["down_proj_bias"]
    down = before["down_proj"]
    want["down_proj"] = torch.stack([torch.stack([down[e].select(0 if style.transposed else 1, k) for k in idx[e]],
                                                 dim=0 if style.transposed else 1) for e in range(E)])
    with scratch(list(m.parameters()) if on_scratch else []):
        style.take_neurons(m, torch.tensor(idx))
    for n, p in m.named_parameters():
        assert torch.equal(p.data, want[n]), n
        assert p.is_contiguous()
        if n != "down_proj_bias":
            assert (p.data_ptr() == ptrs[n]) == on_scratch, n  # in place exactly when the buffer was scratch


# ------------------------------------------------------------------ the lazy loader's visits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("scratch") / "m", dtype=torch.bfloat16, num_experts=8)


def test_lazy_layer_lends_only_its_own_expert_buffers(tiny):
    lazy = load_lazy(tiny)
    adapter = get_adapter(lazy.model.config, lazy.model)
    with lazy.layer(1) as layer:  # layer 0 of the tiny model is dense
        experts = adapter.experts(adapter.block(lazy.model, 1))
        fused = [experts.gate_up_proj, experts.down_proj]
        assert all(is_scratch(p) for p in fused)  # read straight into buffers of their own (io/lazy_direct.py)
        assert not is_scratch(layer.self_attn.q_proj.weight)  # loaded by transformers: never rewritten
    assert not any(is_scratch(p) for p in fused)
    lazy.direct = {}  # everything through transformers' loader: nothing to lend
    with lazy.layer(1):
        experts = adapter.experts(adapter.block(lazy.model, 1))
        assert not is_scratch(experts.gate_up_proj)


def test_removal_in_a_lazy_visit_shrinks_in_place_to_the_kept_experts(tiny):
    ref = load_model(tiny, "auto")
    adapter = get_adapter(ref.config, ref)
    want = {n: _rows(p.detach(), [0, 2, 3, 6]) for n, p in
            adapter.experts(adapter.block(ref, 1)).named_parameters(recurse=False)}
    lazy = load_lazy(tiny)
    with lazy.layer(1):
        experts = adapter.experts(adapter.block(lazy.model, 1))
        ptrs = {n: p.data_ptr() for n, p in experts.named_parameters(recurse=False)}
        prune_layer(lazy.model, adapter, PrunePlan({1: [0, 2, 3, 6]}, 8), 1)
        experts = adapter.experts(adapter.block(lazy.model, 1))
        for n, p in experts.named_parameters(recurse=False):
            assert torch.equal(p.data, want[n]) and p.data_ptr() == ptrs[n], n
    again = load_lazy(tiny)
    with again.layer(1):  # the checkpoint itself is untouched
        experts = adapter.experts(adapter.block(again.model, 1))
        assert experts.gate_up_proj.shape[0] == 8

"""The collector's per-token reductions, a few rows at a time on the CPU (`stats/slot_sums.py`), equal the same
reductions over the whole batch bit for bit, in every chunk including a short last one."""

from __future__ import annotations

import pytest
import torch

from moeprune.io.memory import COMPUTE_REUSE
from moeprune.stats.slot_sums import dot_terms, peak_and_norm, row_step, weighted_sum


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_reductions_equal_the_whole_batch(dtype):
    T, k, H = 601, 4, 1024  # rows of 16 KB in float32: 256 per chunk, the last chunk short
    assert row_step(T, k * H * 4, torch.device("cpu")) < T, "one chunk would prove nothing"
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(T, k, H, generator=gen).to(dtype)
    gate = torch.rand(T, k, generator=gen).to(dtype)
    h, r = torch.randn(T, H, generator=gen).to(dtype), torch.randn(T, H, generator=gen).to(dtype)
    ff = f.float()  # the reference: the whole batch at once
    peak, norm = peak_and_norm(f)
    assert torch.equal(peak, torch.maximum(ff.amax(dim=-1), -ff.amin(dim=-1)).double())
    assert torch.equal(norm, torch.linalg.vector_norm(ff, dim=-1).double())
    assert torch.equal(weighted_sum(f, gate), (f * gate[..., None].to(f.dtype)).sum(dim=1))
    hd, rd = h.double(), r.double()
    for got, want in zip(dot_terms(h, r), ((hd * hd).sum(-1), (hd * rd).sum(-1), (rd * rd).sum(-1)), strict=True):
        assert torch.equal(got, want)


def test_row_step_keeps_each_temporary_under_the_reuse_threshold():
    cpu = torch.device("cpu")
    assert row_step(10_000, 1 << 14, cpu) * (1 << 14) <= COMPUTE_REUSE
    assert row_step(10_000, COMPUTE_REUSE * 2, cpu) == 1  # a row above the threshold still goes one at a time
    assert row_step(10, 1, cpu) == 10
    assert row_step(10_000, 1 << 14, torch.device("meta")) == 10_000  # not a CPU: one chunk


def test_weighted_sum_keeps_the_graph_when_an_input_requires_grad():
    """`out=` refuses autograd inputs: with grad enabled and f requiring it, the sum is the plain expression and
    its gradient is the gate weights."""
    f = torch.randn(600, 4, 1024, generator=torch.Generator().manual_seed(2), requires_grad=True)
    gate = torch.rand(600, 4, generator=torch.Generator().manual_seed(3))
    y = weighted_sum(f, gate)
    assert torch.equal(y, (f * gate[..., None]).sum(dim=1))
    y.sum().backward()
    assert torch.equal(f.grad, gate[..., None].expand_as(f))

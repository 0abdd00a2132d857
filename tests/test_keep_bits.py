"""Packed keep masks (`sparsity/keep_bits.py`): `apply_keep` against the product with the unpacked bools computed
by numpy alone (an independent reference: each bit read with a shift), for every float dtype, widths that are not a
multiple of 8, strided views of fused expert tensors and parameters that require grad; the zeros it writes are +0.0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.sparsity.keep_bits import apply_keep, pack, unpack


def _reference_keep(bits: torch.Tensor, n_in: int) -> np.ndarray:
    """keep[i, k] = bit (k mod 8) of byte ⌊k/8⌋ of row i, one bit at a time."""
    b = bits.numpy()
    k = np.arange(n_in)
    return ((b[:, k // 8] >> (k % 8)) & 1).astype(bool)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n_in", [16, 13, 1])
def test_apply_keep_equals_the_masked_product(dtype, n_in):
    g = torch.Generator().manual_seed(n_in)
    fused = torch.randn(3, 10, n_in, generator=g).to(dtype)  # [E, 2I, H]: rows 5..9 of expert 1 are its up half
    keep = torch.rand(5, n_in, generator=g) > 0.5
    bits = pack(keep)
    assert np.array_equal(unpack(bits, n_in).numpy(), _reference_keep(bits, n_in))
    want = fused.clone()
    ref = _reference_keep(bits, n_in)
    want[1, 5:] = torch.from_numpy(np.where(ref, want[1, 5:].float().numpy(), 0.0)).to(dtype)
    apply_keep(fused[1, 5:], bits)
    assert torch.equal(fused, want)  # values, and every other row untouched
    dropped = fused[1, 5:][torch.from_numpy(~ref)]
    assert not torch.signbit(dropped).any()  # +0.0, also where the weight was negative


def test_apply_keep_on_a_parameter_and_a_transposed_view():
    w = torch.nn.Parameter(torch.randn(4, 9))
    keep = torch.rand(4, 9) > 0.3
    want = torch.where(keep, w.detach(), torch.zeros(()))
    with torch.no_grad():
        apply_keep(w, pack(keep))
    assert torch.equal(w.detach(), want)
    t = torch.randn(9, 4)
    keep = torch.rand(4, 9) > 0.3
    want = torch.where(keep, t.T, torch.zeros(()))
    apply_keep(t.T, pack(keep))  # not contiguous in its last dim: the masked_fill path
    assert torch.equal(t.T, want)


def test_apply_keep_refuses_bits_of_another_shape():
    w = torch.randn(4, 9)
    with pytest.raises(MoePruneError, match="do not fit"):
        apply_keep(w, pack(torch.ones(3, 9, dtype=torch.bool)), "layer 0 expert 1 gate")
    with pytest.raises(MoePruneError, match="layer 0 expert 1 gate"):
        apply_keep(w, pack(torch.ones(4, 17, dtype=torch.bool)), "layer 0 expert 1 gate")

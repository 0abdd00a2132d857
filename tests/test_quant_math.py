"""Quantization math against references written here from the formulas: RTN (compressed-tensors' scale and
rounding), GPTQ against a direct column-by-column implementation, and the scheme's refusals."""

from __future__ import annotations

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.quant.gptq import gptq
from moeprune.quant.rtn import dequantize, fake_quantize, quantize
from moeprune.quant.scheme import QuantScheme, scheme_named


def rtn_reference(w: torch.Tensor, bits: int, g: int, symmetric: bool = True):
    """compressed-tensors' group quantization, from its formula, in w's dtype: (q, s, z, ŵ)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = w.reshape(w.shape[0], -1, g)
    lo = torch.minimum(x.amin(-1), torch.zeros((), dtype=w.dtype))
    hi = torch.maximum(x.amax(-1), torch.zeros((), dtype=w.dtype))
    rng = torch.tensor(float(qmax - qmin), dtype=w.dtype)
    if symmetric:
        s = torch.maximum(-lo, hi) / (rng / 2)
    else:
        s = (hi - lo) / rng
    s[s == 0] = torch.finfo(w.dtype).eps
    z = torch.zeros_like(s) if symmetric else torch.round(torch.clamp(qmin - lo / s, qmin, qmax))
    q = torch.round(torch.clamp(x / s[..., None] + z[..., None], qmin, qmax))
    w_hat = ((q - z[..., None]) * s[..., None]).reshape(w.shape)
    return q.reshape(w.shape), s, z, w_hat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_equals_the_formula(dtype, bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(24, 64, generator=g) * 0.1).to(dtype)
    w[0, :16] = 0  # an all-zero group: scale eps
    q, s, z = quantize(w, bits, 16, symmetric)
    rq, rs, rz, rw = rtn_reference(w, bits, 16, symmetric)
    assert torch.equal(q.to(dtype), rq) and torch.equal(s, rs)
    if not symmetric:
        assert torch.equal(z.to(dtype), rz)
    assert torch.equal(fake_quantize(w, bits, 16, symmetric), rw)
    assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
    assert (rw != 0).any()


def test_fake_quantize_equals_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for bits in (2, 3, 4, 8):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=32)
        x = w.reshape(32, 4, 32)
        s, z = calculate_qparams(x.amin(-1), x.amax(-1), args)
        assert torch.equal(fake_quantize(w, bits, 32), ct_fake(w, s, z, args))


def gptq_reference(w: torch.Tensor, H: torch.Tensor, bits: int, g: int, damp: float) -> torch.Tensor:
    """GPTQ, column by column with no lazy batching: H⁻¹ through Cholesky, each column's error pushed onto every
    later column with the rows of the upper Cholesky factor of H⁻¹; a group's scale from the updated weights at its
    first column. Returns q [out, in]."""
    W = w.double().clone()
    H = H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True)
    n = W.shape[1]
    Q = torch.zeros_like(W)
    s = None
    for j in range(n):
        if j % g == 0:
            _, s, _, _ = rtn_reference(W[:, j:j + g].to(w.dtype), bits, g)
            s = s[:, 0]
        q = torch.round(torch.clamp(W[:, j].to(w.dtype) / s, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
        Q[:, j] = q.double()
        err = (W[:, j] - (q * s).double()) / U[j, j]
        for k in range(j + 1, n):
            W[:, k] -= err * U[j, k]
    return Q


@pytest.mark.parametrize("bits,block", [(4, 16), (3, 128), (8, 32)])
def test_gptq_equals_direct_column_update(bits, block):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 48, generator=g) * 0.2
    X = torch.randn(300, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X
    got = gptq(w, H, QuantScheme(bits, 16), damp=0.01, block=block)
    want = gptq_reference(w, H, bits, 16, 0.01)
    assert torch.equal(got.q.double(), want)
    # and it beats round to nearest on the layer-wise loss it minimises
    rq, rs, rz = quantize(w, bits, 16)
    loss = [float(((X.float() @ (w - dequantize(q, s, None, 16)).T) ** 2).sum()) for q, s in
            ((got.q, got.scale), (rq, rs))]
    assert loss[0] < loss[1]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(act_order):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = gptq(w, 2 * torch.eye(32, dtype=torch.float64), QuantScheme(4, 8), damp=0.0, act_order=act_order)
    q, s, _ = quantize(w, 4, 8)
    assert torch.equal(got.q, q) and torch.equal(got.scale, s)


def test_scheme_refusals():
    with pytest.raises(MoePruneError, match="stores integer weights of 2..8 bits"):
        QuantScheme(bits=16)
    with pytest.raises(MoePruneError, match="stores integer weights of 2..8 bits"):
        fake_quantize(torch.zeros(2, 8), 1, 8)
    with pytest.raises(MoePruneError, match="Did you mean 'w4a16'"):
        scheme_named("w4a61")
    with pytest.raises(MoePruneError, match="does not divide the 48 input features"):
        quantize(torch.zeros(2, 48), 4, 32)

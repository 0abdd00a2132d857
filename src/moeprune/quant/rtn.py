"""Round to nearest (RTN) with compressed-tensors' own formula, so an export dequantizes to `fake_quantize`'s result.

For a weight W [out, in] in groups of g consecutive input features (W viewed as [out, in/g, g]), b bits,
q_min = −2^(b−1), q_max = 2^(b−1) − 1, all arithmetic in W's dtype as compressed-tensors does it
(`quantization/utils/helpers.py:calculate_qparams`, `lifecycle/forward.py`):

    lo = min(min_group W, 0),  hi = max(max_group W, 0)                                          [out, in/g]
    symmetric:   s = max(|lo|, |hi|) / ((q_max − q_min) / 2),  z = 0
    asymmetric:  s = (hi − lo) / (q_max − q_min),              z = round(clamp(q_min − lo / s, q_min, q_max))
    s = eps(dtype) where s == 0
    q = clamp(round(W / s + z), q_min, q_max)                   (round half to even, as torch.round)
    Ŵ = (q − z) · s                                             (dequantize, in s's dtype)

Note the symmetric scale divides by (2^b − 1)/2 (7.5 at 4 bits): the largest |W| of a group maps to ±(2^(b−1) − ½),
which rounds to q_min on the negative side and is clamped to q_max on the positive side (compressed-tensors'
convention).
"""

from __future__ import annotations

import torch

from moeprune.quant.scheme import QuantScheme, check_bits


def _scheme(bits: int | QuantScheme, group_size: int | None, symmetric: bool) -> QuantScheme:
    if isinstance(bits, QuantScheme):
        return bits
    return QuantScheme(check_bits(bits), group_size if group_size is not None else 128, symmetric)


def _grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    out, inp = w.shape
    scheme.check_divides(inp, f"a [{out}, {inp}] weight")
    return w.reshape(out, inp // scheme.group_size, scheme.group_size)  # [out, in/g, g]


def qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [out, in/g] in w's dtype, zero point [out, in/g] int8 or None when symmetric) of W [out, in]."""
    g = _grouped(w, scheme)
    lo = torch.clamp(g.amin(-1), max=0)  # [out, in/g]
    hi = torch.clamp(g.amax(-1), min=0)
    span = torch.tensor(float(scheme.qmax - scheme.qmin), dtype=w.dtype)  # 2^b − 1
    if scheme.symmetric:
        scale = torch.maximum(lo.abs(), hi) / (span / 2)
        zero = None
    else:
        scale = (hi - lo) / span
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype), scale)
    if not scheme.symmetric:
        zero = torch.round(torch.clamp(scheme.qmin - lo / scale, scheme.qmin, scheme.qmax)).to(torch.int8)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
                  ) -> torch.Tensor:
    """q [out, in] int8 = clamp(round(W / s + z), q_min, q_max) with given scales [out, in/g] (W's dtype)."""
    g = _grouped(w, scheme)
    x = g / scale.to(w.dtype)[..., None]  # [out, in/g, g]
    if zero is not None:
        x = x + zero.to(w.dtype)[..., None]
    return torch.round(torch.clamp(x, scheme.qmin, scheme.qmax)).to(torch.int8).reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Ŵ [out, in] = (q − z) · s in s's dtype (what compressed-tensors' decompression returns)."""
    out, inp = q.shape
    x = q.reshape(out, inp // group_size, group_size).to(scale.dtype)  # [out, in/g, g]
    if zero is not None:
        x = x - zero.to(scale.dtype)[..., None]
    return (x * scale[..., None]).reshape(out, inp)


def quantize(w: torch.Tensor, bits: int | QuantScheme, group_size: int | None = None, symmetric: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RTN of W [out, in]: (q int8 [out, in], scale [out, in/g] in W's dtype, zero int8 [out, in/g] or None)."""
    scheme = _scheme(bits, group_size, symmetric)
    scale, zero = qparams(w, scheme)
    return quantize_with(w, scale, zero, scheme), scale, zero


def fake_quantize(w: torch.Tensor, bits: int | QuantScheme, group_size: int | None = None, symmetric: bool = True
                  ) -> torch.Tensor:
    """dequantize(quantize(W)) [out, in] in W's dtype: the weight a stock reload of the export holds.

    `fake_quantize(w, bits, group_size, symmetric=True)` or `fake_quantize(w, scheme)`."""
    scheme = _scheme(bits, group_size, symmetric)
    q, scale, zero = quantize(w, scheme)
    return dequantize(q, scale, zero, scheme.group_size)

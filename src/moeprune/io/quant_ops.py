"""transformers' dequantization ops, as `io/lazy.py` hands them to the loader, with one fix: FP8 partial blocks.

transformers' `Fp8Dequantize` derives the block size from the scale grid (rows / scale_rows). That is right when
every dimension is a whole number of blocks, and wrong at the edge of a matrix whose size is not: DeepSeek-V3's
`kv_a_proj_with_mqa.weight` has 576 rows, 4.5 blocks of 128, so its `weight_scale_inv` has ceil(576/128) = 5 rows
and transformers (5.24) refuses it (576 is not divisible by 5); a 24-row weight in 16-row blocks (scale rows
ceil(24/16) = 2) would even be dequantized with 12-row blocks, silently wrong. `PartialBlockFp8Dequantize` keeps
transformers' op (and its exact math) for whole blocks and applies the format's definition otherwise:

    W_deq[.., r, c] = W[.., r, c] * S[.., r // b0, c // b1]      (b = quantization_config.weight_block_size)

`fix_quantizer(method, hf_quantizer)` makes a transformers quantizer use the fixed ops (`FIXES`, by method; MXFP4
blocks are always whole, nothing to fix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _e8m0_or_float(scales: torch.Tensor) -> torch.Tensor:
    """Scales as float32; ue8m0 bytes (uint8) are exponents: 2 ** (s - 127), as transformers reads them."""
    return (scales.float() - 127.0).exp2() if scales.dtype == torch.uint8 else scales.float()


def fp8_dequantize_partial(quantized: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
                           dtype: torch.dtype) -> torch.Tensor:
    """W [.., rows, cols] float8 with S [.., ceil(rows/b0), ceil(cols/b1)] -> W * S per block, in `dtype`."""
    rows, cols = quantized.shape[-2:]
    s = _e8m0_or_float(scales)
    s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :]  # [.., rows, ceil(cols/b1)]
    s = s.repeat_interleave(block[1], dim=-1)[..., :cols]  # [.., rows, cols]
    return (quantized.float() * s).to(dtype)


def _fp8_ops(hf_quantizer) -> None:
    from moeprune.compat import Fp8Dequantize

    class PartialBlockFp8Dequantize(Fp8Dequantize):
        """transformers' Fp8Dequantize, right for matrices that end in a partial block."""

        def _dequantize_one(self, quantized, scales, output_dtype=None):
            block = self.hf_quantizer.quantization_config.weight_block_size
            rows, cols = quantized.shape[-2:]
            partial = block is not None and scales.dim() >= 2 and (rows % block[0] or cols % block[1])
            if not partial or quantized.dtype.itemsize != 1 or not quantized.dtype.is_floating_point:
                return super()._dequantize_one(quantized, scales, output_dtype)
            if output_dtype is None:  # transformers' default: the scales' dtype when it is a float wider than a byte
                wide = scales.dtype.is_floating_point and scales.element_size() >= 2
                output_dtype = scales.dtype if wide else torch.bfloat16
            return fp8_dequantize_partial(quantized, scales, tuple(block), output_dtype)

    operations = hf_quantizer.get_load_operations()
    hf_quantizer.get_load_operations = lambda: {**operations, "dequantize": PartialBlockFp8Dequantize}


FIXES: dict[str, Callable] = {"fp8": _fp8_ops}  # quant_method -> what to fix in its transformers quantizer


def fix_quantizer(method: str, hf_quantizer) -> None:
    """Replace this quantizer's (instance-level) load operations by the fixed ones, when the method has a fix."""
    if method in FIXES:
        FIXES[method](hf_quantizer)

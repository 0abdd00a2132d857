"""Bytes of a routed expert stored at a bit width, as compressed-tensors' pack-quantized format stores it.

One linear weight W [out, in] quantized to b bits with groups of g input columns (compressed-tensors 0.20.1,
`compressors/pack_quantized`: values packed densely into int32 along the input dimension, zero points packed
along the output dimension):

    weight_packed   out · ⌈in·b / 32⌉ · 4                       bytes
    weight_scale    out · ⌈in / g⌉ · s                           (s = bytes of the scale dtype: the weight's dtype)
    weight_zero_point  ⌈in / g⌉ · ⌈out·b / 32⌉ · 4               (asymmetric only)
    weight_shape    2 · 8                                        (an int64 [2] tensor per weight)

A width b ≥ 16 means "left at its stored dtype": out · in · d bytes (d = the stored dtype's bytes), no scales.
An expert is its gate [I, H], up [I, H] and down [H, I] projections (up-only experts: no gate), plus its biases
at their stored dtype (never quantized). Counts are tensor bytes, as `--max-shard-size` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeprune.errors import MoePruneError

STORED = 16  # widths >= STORED: the expert keeps its stored dtype (no quantization)
MIN_PACKED, MAX_PACKED = 2, 8  # pack-quantized stores 1..8 bits; 1 bit leaves a symmetric range {-1, 0}: refused


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PackedFormat:
    """How quantized weights are stored: group size along the input dimension, symmetric or with zero points,
    and the bytes of one scale (the checkpoint's weight dtype: 2 for bf16/fp16, 4 for fp32)."""

    group_size: int = 128
    symmetric: bool = True
    scale_bytes: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise MoePruneError(f"group size must be a positive integer (e.g. 128), got {self.group_size!r}.")
        if self.scale_bytes not in (1, 2, 4, 8):
            raise MoePruneError(f"scale bytes must be 1, 2, 4 or 8, got {self.scale_bytes!r}.")

    def matrix_bytes(self, out: int, inp: int, bits: int, stored_bytes: int) -> int:
        """Bytes of one weight [out, inp] at `bits` (≥ STORED: its stored dtype, `stored_bytes` per value)."""
        check_width(bits)
        if bits >= STORED:
            return out * inp * stored_bytes
        groups = _ceil(inp, self.group_size)
        packed = out * _ceil(inp * bits, 32) * 4  # [out, ⌈in·b/32⌉] int32
        scales = out * groups * self.scale_bytes  # [out, ⌈in/g⌉]
        zeros = 0 if self.symmetric else groups * _ceil(out * bits, 32) * 4  # [⌈in/g⌉, ⌈out·b/32⌉] int32
        return packed + scales + zeros + 16  # + weight_shape int64 [2]


def check_width(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (MIN_PACKED <= bits <= MAX_PACKED or bits >= STORED):
        raise MoePruneError(f"bit width {bits!r} cannot be stored: pack-quantized weights take {MIN_PACKED}.."
                            f"{MAX_PACKED} bits; give {STORED} (or more) to leave an expert at its stored dtype.")
    return bits


@dataclass(frozen=True)
class ExpertShape:
    """The shapes of one routed expert: hidden size H, width I (neurons), gated (gate + up) or up-only,
    bytes per stored value, and whether it has biases (gate/up [I] and down [H], kept at the stored dtype)."""

    hidden: int
    width: int
    gated: bool = True
    stored_bytes: int = 2
    biased: bool = False

    @property
    def bias_bytes(self) -> int:
        return ((2 if self.gated else 1) * self.width + self.hidden) * self.stored_bytes if self.biased else 0

    @property
    def params(self) -> int:
        """Weights that are quantized: (2 or 1)·I·H + H·I."""
        return (3 if self.gated else 2) * self.hidden * self.width

    def matrices(self) -> list[tuple[int, int]]:
        """(out, in) of each quantized weight: gate [I, H], up [I, H], down [H, I]."""
        up = [(self.width, self.hidden)] * (2 if self.gated else 1)
        return [*up, (self.hidden, self.width)]

    def bytes(self, bits: int, fmt: PackedFormat) -> int:
        return self.bias_bytes + sum(fmt.matrix_bytes(o, i, bits, self.stored_bytes) for o, i in self.matrices())

    def narrowed(self, width: int) -> ExpertShape:
        """The same expert with `width` neurons (after neuron removal)."""
        return ExpertShape(self.hidden, width, self.gated, self.stored_bytes, self.biased)

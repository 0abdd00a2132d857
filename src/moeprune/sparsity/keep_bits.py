"""Keep masks as packed bits: what a wanda plan stores for every expert matrix it sparsifies.

    pack(keep)          keep [out, in] bool -> bits [out, ⌈in/8⌉] uint8, bit b of byte c of row i = keep[i, 8c + b]
                        (numpy's little bit order); the padding bits of a row's last byte are 0
    unpack(bits, in)    bits [out, ⌈in/8⌉] uint8 -> keep [out, in] bool
    apply_keep(W, bits) W ← W ⊙ keep in place, dropped weights set to +0.0

One bit per weight is 1/16 of a bf16 matrix: a plan that masks every routed expert of a model is about 6 % of its
experts' bytes. (Plans that held the masked values were a second copy of the experts, written to the scratch store,
copied into the plan file and read again to hash it.) Applying a plan is W ← W ⊙ unpack(bits), on the model as the
earlier stages leave it (`apply_keep`).
"""

from __future__ import annotations

import numpy as np
import torch

from moeprune.errors import MoePruneError


def pack(keep: torch.Tensor) -> torch.Tensor:
    """keep [out, in] bool (any device) -> [out, ⌈in/8⌉] uint8 on the CPU."""
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"pack takes a 2-D bool mask, not {keep.dtype} {tuple(keep.shape)}")
    return torch.from_numpy(np.packbits(keep.cpu().numpy(), axis=1, bitorder="little"))


def packed_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The packed shape of a [out, in] mask."""
    out, n_in = shape
    return out, (n_in + 7) // 8


def unpack(bits: torch.Tensor, n_in: int, what: str = "mask") -> torch.Tensor:
    """[out, ⌈in/8⌉] uint8 -> keep [out, in] bool on the CPU; a wrong dtype or width is refused with `what` named."""
    if bits.dtype != torch.uint8 or bits.dim() != 2 or bits.shape[1] != (n_in + 7) // 8:
        raise MoePruneError(f"{what}: packed keep bits must be uint8 [out, {(n_in + 7) // 8}] for {n_in} inputs; "
                            f"this one is {bits.dtype} {tuple(bits.shape)}.")
    return torch.from_numpy(np.unpackbits(bits.cpu().numpy(), axis=1, count=n_in, bitorder="little").view(np.bool_))


_INT_OF_SIZE = {1: (np.int8, torch.int8), 2: (np.int16, torch.int16), 4: (np.int32, torch.int32),
                8: (np.int64, torch.int64)}
_LANES: dict[int, np.ndarray] = {}  # element size -> [256, 8] all-ones / zero words of each byte's 8 bits


def _lanes(size: int) -> np.ndarray:
    """[256, 8] signed ints of `size` bytes: row b, column c is -1 (every bit set) where bit c of b is 1, else 0."""
    if size not in _LANES:
        bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")  # [256, 8]
        _LANES[size] = -bits.astype(_INT_OF_SIZE[size][0])
    return _LANES[size]


def apply_keep(weight: torch.Tensor, bits: torch.Tensor, what: str = "mask") -> None:
    """weight [out, in] ← weight ⊙ unpack(bits, in), in place; the dropped weights become +0.0 (what Wanda's own
    `W[mask] = 0` writes; `W * 0` would give -0.0 for negative W).

    On the CPU the mask is ANDed into the weight's bits: each packed byte selects a row of 8 all-ones / zero words
    (`np.take`, one row per byte), and the weight viewed as integers of its size is ANDed with them. One thread,
    [448, 1 024] bf16 view of a fused expert tensor: 1.0 ms (`mul_` by the unpacked bools, which widens them to bf16
    first) -> 0.1 ms. Elsewhere (GPU): `masked_fill_`."""
    out, n_in = weight.shape
    keep_shape = (out, (n_in + 7) // 8)
    if bits.dtype != torch.uint8 or tuple(bits.shape) != keep_shape:
        unpack(bits, n_in, what)  # the shape / dtype error, worded once
        raise MoePruneError(f"{what}: packed keep bits {tuple(bits.shape)} do not fit a [{out}, {n_in}] weight.")
    w = weight.detach()
    if w.device.type != "cpu" or w.stride(-1) != 1 or w.element_size() not in _INT_OF_SIZE:
        w.masked_fill_(~unpack(bits, n_in, what).to(w.device), 0)
        return
    lanes = np.take(_lanes(w.element_size()), bits.cpu().numpy(), axis=0)  # [out, ⌈in/8⌉, 8]
    ints = w.view(_INT_OF_SIZE[w.element_size()][1]).numpy()  # [out, in], sharing the weight's memory
    np.bitwise_and(ints, lanes.reshape(out, -1)[:, :n_in], out=ints)

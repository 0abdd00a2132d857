"""Keep masks as packed bits: what a wanda plan stores for every expert matrix it sparsifies.

    pack(keep)          keep [out, in] bool -> bits [out, ⌈in/8⌉] uint8, bit b of byte c of row i = keep[i, 8c + b]
                        (numpy's little bit order); the padding bits of a row's last byte are 0
    unpack(bits, in)    bits [out, ⌈in/8⌉] uint8 -> keep [out, in] bool

One bit per weight is 1/16 of a bf16 matrix: a plan that masks every routed expert of a model is about 6 % of its
experts' bytes. (Plans that held the masked values were a second copy of the experts, written to the scratch store,
copied into the plan file and read again to hash it.) Applying a plan is W ← W ⊙ unpack(bits), on the model as the
earlier stages leave it.
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

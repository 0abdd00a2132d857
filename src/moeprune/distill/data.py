"""Training windows and their order: a pure function of (seed, step), so a resumed run reads the same batches.

    windows(sets)            the calibration windows of every set, concatenated: input_ids, attention_mask [N, L]
                             (never a set's `held_out_ids`: those stay unseen for the quality check)
    batch_indices(seed, step, n, b)
                             window positions step·b .. step·b + b − 1 of an endless stream of epochs, epoch e
                             being `torch.randperm(n)` under the generator seeded with (seed, e)
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from moeprune.errors import MoePruneError

if TYPE_CHECKING:
    from moeprune.calibration.data import CalibSet


def windows(sets: list[CalibSet]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [N, L] of every set's sampled windows, in set order."""
    if not sets:
        raise MoePruneError("distillation needs calibration windows: pass --calib NAME=PATH.")
    lengths = {int(s.input_ids.shape[1]) for s in sets}
    if len(lengths) != 1:
        raise MoePruneError(f"calibration sets have windows of different lengths {sorted(lengths)}; give one "
                            "--seq-len for all.")
    ids = torch.cat([s.input_ids for s in sets])  # [N, L]
    mask = torch.cat([s.attention_mask for s in sets])  # [N, L]
    return ids, mask


def windows_sha256(ids: torch.Tensor, mask: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (ids, mask):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Windows of step `step` (0-based): positions step·b .. step·b + b − 1 of the seeded epoch stream."""
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(seed, epoch, n)
        out.append(orders[epoch][k])
    return out

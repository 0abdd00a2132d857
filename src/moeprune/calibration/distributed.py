"""Data-parallel calibration on torch.distributed (`torchrun --nproc-per-node N -m moeprune calibrate ...`).

Each rank takes the sequences r, r + N, r + 2N, ... of every calibration set (disjoint shards, together the whole
set), runs its own layer-by-layer calibration, and the float64 sums are all-reduced: two collectives in all (one
SUM over every additive field, one MAX over the maxima), whatever the number of layers and sets. Only rank 0
writes the file. Works with gloo (CPU) and NCCL (GPUs: the flat buffers go to the rank's device for the reduce).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from moeprune.calibration.data import CalibSet
from moeprune.stats.routed import MAX_FIELDS, RoutedStats, packed, unpacked


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_rank() -> Rank:
    """This process's rank; initialises the default process group when launched by torchrun."""
    if not dist.is_available():
        return Rank()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size())
    return Rank()


def rank_device(device: str) -> str:
    """`--device cuda` under torchrun means this rank's own GPU: cuda:LOCAL_RANK (an explicit index is kept)."""
    local = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(local)}"
        torch.cuda.set_device(int(local))
    return device


def shard(sets: list[CalibSet], rank: Rank) -> list[CalibSet]:
    """Rows rank, rank + world, ... of every set ([N, L] -> [⌈(N − rank)/world⌉, L])."""
    if rank.world == 1:
        return sets
    return [replace(s, input_ids=s.input_ids[rank.rank :: rank.world],
                    attention_mask=s.attention_mask[rank.rank :: rank.world]) for s in sets]


def all_reduce_stats(stats: dict[str, dict[int, RoutedStats]], device: str = "cpu") -> None:
    """Sum (max for maxima) every rank's statistics in place; a no-op outside a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    entries = [(st, name) for layers in stats.values() for _, st in sorted(layers.items()) for name in st.sums]
    for op, keep in ((dist.ReduceOp.SUM, False), (dist.ReduceOp.MAX, True)):
        chosen = [(st, name) for st, name in entries if (name in MAX_FIELDS) == keep]
        if not chosen:
            continue
        like = [st.sums[name] for st, name in chosen]
        flat = packed(like).to(device)  # [total]
        dist.all_reduce(flat, op=op)
        for (st, name), t in zip(chosen, unpacked(flat.cpu(), like), strict=True):
            st.sums[name] = t

"""Hidden states at decoder-layer boundaries, kept for a backward pass run one layer at a time.

`BoundaryCache.put(i, [h_i per batch])` keeps layer i's inputs ([B, S, H] per batch) in memory while the cache's
in-memory bytes stay within `budget_bytes`; a layer that would exceed it is written to one safetensors file
(`layer_{i}.safetensors`, one tensor per batch) in a temporary folder (under $TMPDIR, removed on exit) and read
back by `pop(i)`. The whole cache holds L · N_tokens · H elements at most (Qwen3-30B-A3B, 128 × 512 tokens,
float32: 48 · 65536 · 2048 · 4 B ≈ 26 GB), hence the spill.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoePruneError
from moeprune.log import logger

BUDGET_FRACTION = 0.5  # of the memory available when the run starts


def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), or free physical pages where there is no /proc."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget() -> int:
    return int(BUDGET_FRACTION * available_memory())


def check_budget(budget_bytes: int | None) -> int:
    if budget_bytes is None:
        return default_budget()
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise MoePruneError(f"cache_budget_bytes must be an integer >= 0 (0 = keep every boundary on disk) or None "
                            f"(half the available memory), got {budget_bytes!r}.")
    return budget_bytes


class BoundaryCache:
    """Per-layer lists of per-batch tensors; in memory up to `budget_bytes`, on disk beyond."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.in_memory: dict[int, list[torch.Tensor]] = {}
        self.on_disk: dict[int, Path] = {}
        self.bytes_in_memory = 0
        self.folder: Path | None = None

    def __enter__(self) -> BoundaryCache:
        return self

    def __exit__(self, *exc) -> None:
        self.in_memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def put(self, i: int, tensors: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.bytes_in_memory + size <= self.budget:
            self.in_memory[i] = tensors
            self.bytes_in_memory += size
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="moeprune_boundaries_"))
            logger.info("layer-boundary cache over its budget (%.2f GB): spilling layers to %s",
                        self.budget / 1e9, self.folder)
        path = self.folder / f"layer_{i}.safetensors"
        save_file({str(b): t.contiguous() for b, t in enumerate(tensors)}, str(path))
        self.on_disk[i] = path

    def pop(self, i: int) -> list[torch.Tensor]:
        """Layer i's tensors (read back from disk if spilled); the cache forgets them."""
        if i in self.in_memory:
            tensors = self.in_memory.pop(i)
            self.bytes_in_memory -= sum(t.numel() * t.element_size() for t in tensors)
            return tensors
        if i not in self.on_disk:
            raise KeyError(f"layer {i} is not in the boundary cache")
        path = self.on_disk.pop(i)
        loaded = load_file(str(path))
        path.unlink()
        return [loaded[str(b)] for b in range(len(loaded))]

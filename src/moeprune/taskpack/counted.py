"""Counted reads: a view of checkpoint tensors whose `read()` adds the bytes it reads to a shared counter.

`io.lazy.load_lazy(tensors=...)` reads a model through such a view, so the bytes a task-pack load reads from the
shards are counted where they are read (each tensor's byte ranges, once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.io.safetensors_io import OutTensor, TensorEntry, read_tensor


@dataclass
class ByteCounter:
    total: int = 0


@dataclass(frozen=True)
class CountedTensor:
    tensor: TensorEntry | OutTensor
    counter: ByteCounter

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def dtype(self) -> str:
        return self.tensor.dtype

    def read(self) -> torch.Tensor:
        t = read_tensor(self.tensor) if isinstance(self.tensor, TensorEntry) else self.tensor.read()
        self.counter.total += self.tensor.nbytes
        return t


def counted_view(tensors: list[TensorEntry] | list[OutTensor], counter: ByteCounter) -> list[CountedTensor]:
    return [CountedTensor(t, counter) for t in tensors]

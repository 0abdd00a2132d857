"""A weights plan's expert tensors on disk, one MoE layer read at a time: plans of models larger than memory.

A `WeightsPlan` maps MoE layer ℓ -> expert i -> role -> tensor. Held in a dict that is the whole model's routed
experts (wanda writes every expert), too much for a checkpoint that does not fit in memory. `LayerTensors` is the
same mapping with the tensors left in safetensors files:

    store = SpilledLayers(cast=f)    a temporary folder ($TMPDIR), removed with the store (or at exit)
    store[ℓ] = {i: {role: tensor}}   written at once to ℓ/model.safetensors; nothing stays in memory
    with store.writer(ℓ) as put:     the same, one tensor at a time as they are made: put(i, role, tensor)
    store[ℓ], store.get(ℓ, {})       read back from disk (a fresh dict each time: the caller holds one layer)
    store.index(ℓ)                   {i: [roles]} from the headers, no tensor read
    FileLayers.open(file)            the same view over a saved plan's tensors file ("layer.{ℓ}.expert.{i}.{role}")

`entries()` gives every tensor's byte range, so a plan is saved by copying bytes (`io/safetensors_io.write_file`),
one copy buffer in memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.io.safetensors_io import TensorEntry, read_header, read_tensor

ExpertTensors = dict[int, dict[str, torch.Tensor]]  # expert (current numbering) -> role -> tensor


class LayerTensors(Mapping):
    """{MoE layer: ExpertTensors} whose tensors are byte ranges of safetensors files, read per layer."""

    def __init__(self) -> None:
        self._entries: dict[int, dict[tuple[int, str], TensorEntry]] = {}  # layer -> (expert, role) -> entry

    def __getitem__(self, layer: int) -> ExpertTensors:
        out: ExpertTensors = {}
        for (i, role), entry in sorted(self._entries[layer].items()):
            out.setdefault(i, {})[role] = read_tensor(entry)
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, layer: object) -> bool:
        return layer in self._entries

    def index(self, layer: int) -> dict[int, list[str]]:
        """{expert: [roles]} of one layer, from the headers."""
        out: dict[int, list[str]] = {}
        for i, role in sorted(self._entries.get(layer, {})):
            out.setdefault(i, []).append(role)
        return out

    def entries(self, layer: int) -> dict[tuple[int, str], TensorEntry]:
        return dict(self._entries.get(layer, {}))


class SpilledLayers(LayerTensors):
    """Layers written to a temporary folder as they are computed (the folder goes with the store). `cast(layer,
    experts)`, when given, maps each layer's values before they are written (e.g. to the checkpoint's dtypes)."""

    def __init__(self, where: str | Path | None = None,
                 cast: Callable[[int, ExpertTensors], ExpertTensors] | None = None) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory(prefix="moeprune-weights-", dir=where)
        self._cast = cast

    def __setitem__(self, layer: int, experts: ExpertTensors) -> None:
        with self.writer(layer) as put:
            for i, roles in experts.items():
                for role, t in roles.items():
                    put(i, role, t)

    @contextmanager
    def writer(self, layer: int) -> Iterator[Callable[[int, str, torch.Tensor], None]]:
        """`put(expert, role, tensor)` streams one layer's tensors to its file as they are made (each written at
        once, `io/layered_export.ShardWriter`: memory is the tensor itself; safetensors' `save_file` held a bytes
        copy of the whole layer); the layer is readable once the block ends, and absent if it raises."""
        from moeprune.io.layered_export import HEADER_ROOM_MIN, ShardWriter

        folder = Path(self._dir.name) / str(int(layer))
        folder.mkdir()
        # one file (its header grows if it must), scratch: not fsynced (a plan is saved by copying it)
        out = ShardWriter(folder, 1 << 62, room=HEADER_ROOM_MIN, durable=False)

        def put(i: int, role: str, t: torch.Tensor) -> None:
            if self._cast is not None:
                t = self._cast(layer, {i: {role: t}})[i][role]
            out.add_tensor(f"{i}.{role}", t.detach())

        try:
            yield put
        except BaseException:
            out.abort()
            raise
        files = out.close()
        entries = read_header(folder / files[0])[0] if files else []
        self._entries[int(layer)] = {(int(e.name.split(".", 1)[0]), e.name.split(".", 1)[1]): e for e in entries}


class FileLayers(LayerTensors):
    """The expert tensors of one saved plan tensors file, named "layer.{ℓ}.expert.{i}.{role}"; other names (the
    router's) are returned by `open` for the caller to read."""

    file: Path | None = None

    @classmethod
    def open(cls, file: Path) -> tuple[FileLayers, list[TensorEntry]]:
        store, rest = cls(), []
        store.file = Path(file).resolve()
        for entry in read_header(file)[0]:
            parts = entry.name.split(".")
            if len(parts) < 4 or parts[0] != "layer" or parts[2] not in ("expert", "router"):
                raise MoePruneError(f"{file}: unexpected tensor name {entry.name!r}.")
            if parts[2] == "router":
                rest.append(entry)
                continue
            key = (int(parts[3]), ".".join(parts[4:]))
            store._entries.setdefault(int(parts[1]), {})[key] = entry
        return store, rest


@contextmanager
def layer_sink(experts: dict | SpilledLayers, layer: int) -> Iterator[Callable[[int, str, torch.Tensor], None]]:
    """`put(expert, role, tensor)` into a plan's experts, one layer: streamed to disk for a `SpilledLayers` store
    (`SpilledLayers.writer`), gathered and set as `experts[layer]` for a dict."""
    if isinstance(experts, SpilledLayers):
        with experts.writer(layer) as put:
            yield put
        return
    gathered: ExpertTensors = {}
    yield lambda i, role, t: gathered.setdefault(i, {}).__setitem__(role, t)
    experts[layer] = gathered


def expert_index(experts: Mapping, layer: int) -> dict[int, list[str]]:
    """{expert: [roles]} of one layer of a plan's experts (a dict or a `LayerTensors`), without reading tensors."""
    if isinstance(experts, LayerTensors):
        return experts.index(layer)
    return {i: list(roles) for i, roles in experts.get(layer, {}).items()}

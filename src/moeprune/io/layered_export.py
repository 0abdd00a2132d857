"""Layer-by-layer export: every plan of a chain applied to one decoder layer at a time, for checkpoints larger
than memory and for stages that cannot work on the shards' bytes (merges, neuron removal).

    lazy = load_lazy(source)                                 decoder layers and head on `meta` (`io/lazy.py`)
    for decoder layer i:
        with lazy.layer(i):                                  read from the source shards
            disk dtypes restored, apply_chain_layer(i)       every stage's `apply_layer`, in recipe order
            tensors = revert_weight_conversion(layer i)      in-memory names -> on-disk names (transformers' own
                                                             inverse of its loading conversions, as save_pretrained)
            bytes appended to the current shard file         its header is written when the shard is full
    embeddings, final norm, head, vision tower               copied byte for byte from the source
    config.json = the config the chain leaves                (+ index json when sharded)

The result holds the tensors the in-memory export writes (`load_model` + `apply_chain` + `save_pretrained`):
same names, shapes, dtypes and values (tests/test_layered.py, every family). Peak memory: the non-layer tensors
that `load_lazy` materialises, one decoder layer (and transformers' conversion temporaries, and the stage's own,
e.g. a merge's copies of the layer's experts); output shards are assembled on disk, not in memory. A quantized
source (FP8, MXFP4) is dequantized by the lazy loader, so this export is written in the loader's dtype and its
config drops `quantization_config`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moeprune.io.checkpoint import INDEX_NAME, Checkpoint
from moeprune.io.safetensors_io import COPY_CHUNK, TORCH_TO_ST, OutTensor, copy_range, tensor_bytes, write_file
from moeprune.log import logger
from moeprune.models.base import MoEAdapter


@dataclass
class LayeredResult:
    files: list[str]
    bytes_out: int
    dequantized: str | None = None  # the source's quantization method when the export was written unquantized
    written_while_planning: int = 0  # decoder layers a stage's planning pass wrote (`pipeline/fused.py`)


HEADER_ROOM_MIN = 256 << 10  # bytes kept for a shard's safetensors header before its data (see ShardWriter)
HEADER_ROOM_MAX = 16 << 20
WRITE_BEHIND = 256 << 20  # bytes an export's writer thread may lag behind (held in memory; io/write_behind.py)


@dataclass
class ShardWriter:
    """Tensors written in order to shards of at most `max_bytes` (one tensor larger than that gets its own), with
    memory bounded by one tensor, straight into the shard file: its data starts after `room` bytes kept for the
    header, and `flush` writes the header there padded with spaces (the safetensors format allows trailing
    whitespace in the header). A header larger than the room (many small tensors) is rewritten with the data
    copied behind it, and later shards keep twice that room. Shards get temporary names until `close` renames them
    `model-0000k-of-0000N.safetensors`.

    Each in-memory tensor is written once, not to a spill file and then copied into the shard: CAMERA-P 25 % on the
    24-layer benchmark checkpoint (`benchmarks/big_model.py`, one thread, 3 GiB limit) 127-128 s -> 113 s."""

    folder: Path
    max_bytes: int
    pending: list[tuple[str, str, tuple[int, ...], int, int]] = field(default_factory=list)  # name, dtype, shape,
    pending_bytes: int = 0  # data offsets [begin, end) relative to the data start
    written: list[tuple[Path, list[str]]] = field(default_factory=list)
    total: int = 0
    room: int = 0  # header bytes kept before the data of the shard being written
    durable: bool = True  # fsync each shard when it is complete (an export); False for scratch files
    behind: int = 0  # > 0: writes run on a writer thread with at most this many bytes unwritten (`io/write_behind`)
    _file: Any = None  # the open shard file
    _thread: Any = None  # the WriteBehind, when `behind`

    def __post_init__(self) -> None:
        if not self.room:
            self.room = min(HEADER_ROOM_MAX, max(HEADER_ROOM_MIN, self.max_bytes // 2048)) // 8 * 8
        if self.behind:
            from moeprune.io.write_behind import WriteBehind

            self._thread = WriteBehind(self.behind)

    def _do(self, job, nbytes: int) -> None:
        """Run `job` now, or queue it on the writer thread (in order)."""
        if self._thread is None:
            job()
        else:
            self._thread.submit(job, nbytes)

    def _start(self, nbytes: int) -> None:
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        if self._file is None:
            self._file = open(self.folder / f".part-{len(self.written):05d}.safetensors", "w+b")  # noqa: SIM115
            self._file.seek(8 + self.room)

    def _record(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        self.pending.append((name, dtype, shape, self.pending_bytes, self.pending_bytes + nbytes))
        self.pending_bytes += nbytes
        self.total += nbytes

    def add_copy(self, name: str, entry) -> None:
        """A source tensor (`TensorEntry`), copied byte for byte under `name`."""
        def job() -> None:
            self._start(entry.nbytes)
            with open(entry.file, "rb", buffering=0) as src:
                copy_range(src, self._file, entry.begin, entry.end, bytearray(min(COPY_CHUNK, max(1, entry.nbytes))))
            self._record(name, entry.dtype, tuple(entry.shape), entry.nbytes)

        self._do(job, 0)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """An in-memory tensor: its bytes are written to the shard now, or by the writer thread (`behind`), which
        holds the tensor until then (memory is not held beyond that; the caller must not change it in place
        meanwhile — the export drops each layer's tensors, it never overwrites them)."""
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()

        def job() -> None:
            self._start(nbytes)
            if nbytes:
                self._file.write(tensor_bytes(t))
            self._record(name, TORCH_TO_ST[t.dtype], tuple(t.shape), nbytes)

        self._do(job, nbytes)

    def flush(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        path = Path(f.name)
        header: dict = {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, begin, end in self.pending:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        if len(blob) <= self.room:
            f.seek(0)
            f.write(struct.pack("<Q", self.room) + blob + b" " * (self.room - len(blob)))
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
            f.close()
        else:  # more tensors than the room holds: the data is copied behind a header of its own size
            f.close()
            base = 8 + self.room
            moved = path.with_name(path.name + ".data")
            os.replace(path, moved)
            write_file(path, [OutTensor(name, dtype, shape, moved, ((base + b, base + e),))
                              for name, dtype, shape, b, e in self.pending])
            moved.unlink()
            self.room = max(self.room, min(HEADER_ROOM_MAX, (2 * len(blob) + 7) // 8 * 8))
            logger.debug("shard %s: header of %d bytes; later shards keep %d", path.name, len(blob), self.room)
        self.written.append((path, [t[0] for t in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def _stop(self, cancel: bool = False) -> None:
        """Stop the writer thread: after its queued writes (re-raising a failed one), or skipping them (`cancel`)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.cancel() if cancel else thread.close()

    def abort(self) -> None:
        """Close and delete what was written (the caller failed part-way)."""
        try:
            self._stop(cancel=True)
        except Exception:  # noqa: BLE001 - a write that failed before the cancel: the writes are thrown away
            pass
        if self._file is not None:
            path = Path(self._file.name)
            self._file.close()
            self._file = None
            path.unlink(missing_ok=True)
        for path, _ in self.written:
            path.unlink(missing_ok=True)
        self.written, self.pending, self.pending_bytes = [], [], 0

    def close(self) -> list[str]:
        self._stop()
        self.flush()
        n = len(self.written)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map = {}
        for (path, tensor_names), name in zip(self.written, names, strict=True):
            os.replace(path, self.folder / name)
            weight_map.update(dict.fromkeys(tensor_names, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def export_layered(ckpt: Checkpoint, chain: list, adapters: list[MoEAdapter], folder: Path, max_bytes: int,
                   provenance: dict) -> LayeredResult:
    """Write the chain's result into `folder` (an empty temporary folder): shards, index and config.json."""
    from moeprune.io.lazy import load_lazy

    lazy = load_lazy(ckpt.path, dtype="auto")
    layers = LayerExport(ckpt, lazy, folder, max_bytes)
    return layers.finish(chain, adapters, provenance)


class LayerExport:
    """An export's shards written one decoder layer at a time from a `LazyModel`: the export's own
    (`export_layered`), or the one a stage plans on, which writes each layer as soon as its plan is final
    (`write_layer`, while the layer is materialised for the planning pass; `pipeline/fused.py`). The source's
    other tensors (embeddings, norm, head, vision tower) are copied byte for byte first; `finish` writes the layers
    no pass wrote (read, the whole chain applied) and closes the shards."""

    def __init__(self, ckpt: Checkpoint, lazy, folder: Path, max_bytes: int) -> None:
        from moeprune.compat import WeightConverter, WeightRenaming, rename_source_key
        from moeprune.io.lazy import REST

        self.ckpt, self.lazy, self.folder = ckpt, lazy, folder
        self.disk = ckpt.torch_dtypes()
        self.ignore = [re.compile(p) for p in (getattr(lazy.model, "_keys_to_ignore_on_save", None) or [])]
        self.written: set[int] = set()
        self.writer = ShardWriter(folder, max_bytes, behind=WRITE_BEHIND)
        try:
            for entry in _non_layer_entries(ckpt, lazy, REST, (WeightRenaming, WeightConverter), rename_source_key):
                self.writer.add_copy(entry.name, entry)
        except BaseException:
            self.writer.abort()
            raise

    def write_layer(self, i: int, apply) -> None:
        """Decoder layer i, materialised in the lazy model: its stored dtypes restored, `apply()` run (the plans
        that change it), its tensors written under their on-disk names (transformers' own inverse of its loading
        conversions, as save_pretrained). The layer's tensors must not change afterwards (the writer thread may
        still hold them); the lazy model drops them when the layer's visit ends."""
        from moeprune.compat import revert_weight_conversion
        from moeprune.io.load import match_disk_dtypes

        prefix = f"{self.lazy.layer_prefix}.{i}."
        match_disk_dtypes(self.lazy.layers[i], self.stored_dtypes(i))
        apply()
        layer = self.lazy.layers[i]  # the same module (surgery replaces submodules, not the layer)
        state = {prefix + k: t for k, t in layer.state_dict().items()}
        state = {k: t for k, t in state.items() if not any(p.search(k) for p in self.ignore)}
        taken, views = direct_views(self.lazy.model, state, self.lazy.direct.get(i, {}), revert_weight_conversion)
        state = {k: t for k, t in state.items() if k not in taken}
        for name, t in [*views.items(), *revert_weight_conversion(self.lazy.model, state).items()]:
            self.writer.add_tensor(name, t)
        self.written.add(i)

    def stored_dtypes(self, i: int) -> dict:
        """{name inside decoder layer i: the dtype the checkpoint stores it in}."""
        prefix = f"{self.lazy.layer_prefix}.{i}."
        return {k[len(prefix):]: v for k, v in self.disk.items() if k.startswith(prefix)}

    def finish(self, chain: list, adapters: list[MoEAdapter], provenance: dict) -> LayeredResult:
        """Every decoder layer not written yet: read, every plan of `chain` applied (`apply_chain_layer`; those the
        lazy model's view of the shards already holds are not applied again), written;
        then the shards closed and config.json (the config the chain leaves) written. Failing: what was written is
        deleted."""
        from moeprune.stages.base import apply_chain_layer

        model = self.lazy.model
        held = self.lazy.view_holds  # the first plans, already in the tensors the lazy model reads
        todo, later = chain[held:], adapters[held:]
        try:
            rest = [i for i in range(len(self.lazy.layers)) if i not in self.written]
            for n, i in enumerate(bar := tqdm(rest, leave=False)):
                bar.set_description(f"layer-by-layer export (layer {n + 1}/{len(rest)})")
                with self.lazy.layer(i):
                    self.write_layer(i, lambda i=i: apply_chain_layer(model, todo, i, later))
        except BaseException:
            self.abort()
            raise
        files = self.writer.close()
        quant = _write_config(self.ckpt, adapters[-1], self.folder, provenance, model.dtype)
        return LayeredResult(files, self.writer.total, quant)

    def abort(self) -> None:
        """The shards written so far deleted (the writer thread stops); the caller removes the folder."""
        self.writer.abort()


def direct_views(model, state: dict[str, torch.Tensor], direct: dict, revert) -> tuple[set[str], dict]:
    """The fused expert tensors of `state` that the lazy loader read straight into place (`io/lazy_direct.py`,
    `direct`: parameter -> its checkpoint tensors' `Piece`s) and that still have that layout, as views:
    (the parameters taken, {on-disk name: view of its parameter at the piece's place}).

    Transformers' `revert_weight_conversion` un-concatenates gate and up with `torch.chunk(...).contiguous()`, a
    copy of two thirds of the layer; the pieces are already contiguous places of the parameter. Taken only where
    transformers' own revert, run on a meta stand-in of the parameter, names checkpoint keys of the pieces, each
    with the shape that revert gives it: expert j of a parameter with E' ≤ E experts (removal, merges) sits where
    the source's expert j sat, and a concatenated piece (gate, up) of rows r at offset o sits at (o / r)·r', r' the
    rows revert gives it (r' < r after neuron removal: the chunks of the narrower experts). The rest of the layer
    goes through `revert`. On the 24-layer benchmark checkpoint this removed ~6 s of copying from a wanda export,
    and 2-3 s from a reap → CAMERA-P recipe's (narrower experts: 72 / 72 → 70 / 69 s, alternated)."""
    taken: set[str] = set()
    views: dict[str, torch.Tensor] = {}
    for name, pieces in direct.items():
        t = state.get(name)
        if t is None or t.dim() < 2 or len({p.rows for p in pieces}) != 1:  # equal chunks, or stacked only
            continue
        names = revert(model, {name: torch.empty_like(t, device="meta")})
        by_key = {p.key: p for p in pieces}
        if not names or not set(names) <= set(by_key):  # fewer experts (removal, merges): the first E' names
            continue
        place = {k: _place(t, by_key[k], names[k].shape) for k in names if by_key[k].expert < t.shape[0]}
        if place.keys() != names.keys() or any(tuple(place[k].shape) != tuple(names[k].shape)
                                               or not place[k].is_contiguous() for k in place):
            continue
        taken.add(name)
        views.update(place)
    return taken, views


def _place(t: torch.Tensor, piece, shape: torch.Size) -> torch.Tensor:
    """The view of fused parameter t [E', ...] that revert names `piece`'s key with `shape` (`direct_views`)."""
    if piece.rows is None:
        return t[piece.expert]
    rows = shape[0] if len(shape) else 0
    at = piece.offset // piece.rows * rows  # the chunk's index times its rows now
    return t[piece.expert, at : at + rows]


def _non_layer_entries(ckpt: Checkpoint, lazy, rest: int, kinds: tuple, rename_source_key) -> list:
    """Source tensors outside the decoder layers that the model has (embeddings, norm, head, vision tower);
    tensors the model lacks (e.g. DeepSeek's MTP layer) are left out, as the in-memory export leaves them out."""
    in_layers = {k for i, keys in lazy.keys.items() if i != rest for k in keys}
    keep = set(lazy.keys.get(rest, []))
    meta_sd = lazy.model.state_dict()
    renamings = [c for c in lazy.load_config.weight_mapping or [] if isinstance(c, kinds[0])]
    converters = [c for c in lazy.load_config.weight_mapping or [] if isinstance(c, kinds[1])]
    out = []
    for e in ckpt.entries:
        if e.name in in_layers or e.name not in lazy.entries:  # not in a view of the shards: removed experts
            continue
        if e.name not in keep:  # the head (on meta in the lazy model) or something the model does not have
            target, _ = rename_source_key(e.name, renamings, converters, lazy.model.base_model_prefix, meta_sd)
            if target not in meta_sd and e.name not in meta_sd:
                continue
        out.append(e)
    return out


def _write_config(ckpt: Checkpoint, adapter: MoEAdapter, folder: Path, provenance: dict,
                  dtype: torch.dtype) -> str | None:
    cfg: Any = copy.deepcopy(adapter.root_config)
    quant = getattr(cfg, "quantization_config", None)
    method = None
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", str(quant))
        del cfg.quantization_config
        cfg.dtype = dtype
        logger.warning("%s is quantized (%s): the layer-by-layer export is written in %s without "
                       "quantization_config", ckpt.path, method, str(dtype).removeprefix("torch."))
    cfg.moeprune = provenance
    cfg.save_pretrained(folder)
    return str(method) if method is not None else None

"""Layer-by-layer export: every plan of a chain applied to one decoder layer at a time, for checkpoints larger
than memory and for stages that cannot work on the shards' bytes (merges, neuron removal).

    lazy = load_lazy(source)                                 decoder layers and head on `meta` (`io/lazy.py`)
    for decoder layer i:
        with lazy.layer(i):                                  read from the source shards
            disk dtypes restored, apply_chain_layer(i)       every stage's `apply_layer`, in recipe order
            tensors = revert_weight_conversion(layer i)      in-memory names -> on-disk names (transformers' own
                                                             inverse of its loading conversions, as save_pretrained)
            bytes appended to the current shard's spill file   the shard is written (byte copies) when full
    embeddings, final norm, head, vision tower               copied byte for byte from the source (`OutTensor`)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moeprune.io.checkpoint import INDEX_NAME, Checkpoint
from moeprune.io.safetensors_io import TORCH_TO_ST, OutTensor, write_file
from moeprune.log import logger
from moeprune.models.base import MoEAdapter


@dataclass
class LayeredResult:
    files: list[str]
    bytes_out: int
    dequantized: str | None = None  # the source's quantization method when the export was written unquantized


@dataclass
class ShardWriter:
    """Tensors written in order to shards of at most `max_bytes` (one tensor larger than that gets its own), with
    memory bounded by one tensor: an in-memory tensor's bytes go straight to a spill file next to the shard, and
    each full shard is written by byte copies (`write_file`) from the spill file and the source checkpoint. Shards
    get temporary names until `close` renames them `model-0000k-of-0000N.safetensors`."""

    folder: Path
    max_bytes: int
    pending: list[OutTensor] = field(default_factory=list)
    pending_bytes: int = 0
    written: list[tuple[Path, list[str]]] = field(default_factory=list)
    total: int = 0
    _spill: Any = None  # open file of the current shard's in-memory tensors

    def _queue(self, out: OutTensor) -> None:
        if self.pending and self.pending_bytes + out.nbytes > self.max_bytes:
            self.flush()
        self.pending.append(out)
        self.pending_bytes += out.nbytes
        self.total += out.nbytes

    def add_copy(self, name: str, entry) -> None:
        """A source tensor (`TensorEntry`), copied byte for byte under `name`."""
        self._queue(OutTensor(name, entry.dtype, tuple(entry.shape), entry.file, ((entry.begin, entry.end),)))

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """An in-memory tensor: its bytes are written to the spill file now (memory is not held)."""
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        if self._spill is None:
            self._spill = open(self.folder / f".spill-{len(self.written):05d}", "wb")  # noqa: SIM115
        begin = self._spill.tell()
        if nbytes:
            self._spill.write(t.reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as safetensors
        self._queue(OutTensor(name, TORCH_TO_ST[t.dtype], tuple(t.shape), Path(self._spill.name),
                              ((begin, begin + nbytes),)))

    def flush(self) -> None:
        if not self.pending:
            return
        spill = None
        if self._spill is not None:
            self._spill.close()
            spill, self._spill = Path(self._spill.name), None
        path = self.folder / f".part-{len(self.written):05d}.safetensors"
        write_file(path, self.pending)
        if spill is not None:
            spill.unlink()
        self.written.append((path, [t.name for t in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def close(self) -> list[str]:
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
    from moeprune.compat import WeightConverter, WeightRenaming, rename_source_key, revert_weight_conversion
    from moeprune.io.lazy import REST, load_lazy
    from moeprune.io.load import match_disk_dtypes
    from moeprune.stages.base import apply_chain_layer

    lazy = load_lazy(ckpt.path, dtype="auto")
    model = lazy.model
    disk = ckpt.torch_dtypes()
    writer = ShardWriter(folder, max_bytes)
    for entry in _non_layer_entries(ckpt, lazy, REST, (WeightRenaming, WeightConverter), rename_source_key):
        writer.add_copy(entry.name, entry)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_save", None) or [])]
    n = len(lazy.layers)
    for i in (bar := tqdm(range(n), leave=False)):
        bar.set_description(f"layer-by-layer export (layer {i + 1}/{n})")
        prefix = f"{lazy.layer_prefix}.{i}."
        with lazy.layer(i) as layer:
            match_disk_dtypes(layer, {k[len(prefix):]: v for k, v in disk.items() if k.startswith(prefix)})
            apply_chain_layer(model, chain, i, adapters)
            layer = lazy.layers[i]  # the same module (surgery replaces submodules, not the layer)
            state = {prefix + k: t for k, t in layer.state_dict().items()}
            state = {k: t for k, t in state.items() if not any(p.search(k) for p in ignore)}
            for name, t in revert_weight_conversion(model, state).items():
                writer.add_tensor(name, t)
            del state
    files = writer.close()
    quant = _write_config(ckpt, adapters[-1], folder, provenance, model.dtype)
    return LayeredResult(files, writer.total, quant)


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
        if e.name in in_layers:
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

"""Read and write safetensors files at the byte level, one tensor at a time.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data block; offsets
are relative to the data block. Working on bytes lets streaming surgery copy experts without decoding them
(any dtype, bit-exact) with memory bounded by one copy buffer, and lets every shard be validated before
expensive work starts.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.io.read_ahead import in_windows, places
from moeprune.log import logger

_KERNEL_COPY = hasattr(os, "copy_file_range")  # `copy_range`: off after the first refusal
FLOAT_DTYPES = frozenset({"F64", "F32", "BF16", "F16"})  # safetensors names of the floating dtypes

# safetensors dtype string -> (bytes per element, torch dtype or None when torch lacks it)
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
    "U16": (2, getattr(torch, "uint16", None)),
    "U32": (4, getattr(torch, "uint32", None)),
    "U64": (8, getattr(torch, "uint64", None)),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
    "E8M0": (1, getattr(torch, "float8_e8m0fnu", None)),
}
TORCH_TO_ST = {dt: name for name, (_, dt) in DTYPES.items() if dt is not None}
MAX_HEADER = 100 * 1024 * 1024
COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside a safetensors file: where its bytes are (absolute file offsets)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes in row-major order, little-endian as safetensors stores them (a copy only when `t` is not
    contiguous): what the shards are written from and what plan and alignment digests hash."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def read_header(path: Path) -> tuple[list[TensorEntry], dict]:
    """Parse and validate one file's header; raise MoePruneError naming the file when it is truncated/corrupt."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MoePruneError(f"{path}: not a safetensors file (only {size} bytes). Re-download or re-save it.")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or n > MAX_HEADER or 8 + n > size:
            raise MoePruneError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MoePruneError(f"{path}: corrupt safetensors header ({e}).") from e
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise MoePruneError(f"{path}: corrupt header entry for {name!r}.") from err
        if dtype not in DTYPES:
            raise MoePruneError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}.")
        if e - b != math.prod(shape) * DTYPES[dtype][0] or b < 0:
            raise MoePruneError(f"{path}: tensor {name!r} has offsets {b}..{e} that do not match shape {shape}.")
        if base + e > size:
            raise MoePruneError(
                f"{path} is truncated: tensor {name!r} ends at byte {base + e} but the file has {size} bytes. "
                "Re-download or re-save the checkpoint."
            )
        entries.append(TensorEntry(name, path, dtype, shape, base + b, base + e))
    entries.sort(key=lambda t: t.begin)
    return entries, meta


def read_tensor(entry: TensorEntry, rows: Iterable[int] | None = None) -> torch.Tensor:
    """Load one tensor (optionally only some rows of dim 0) into a fresh CPU tensor."""
    torch_dtype = DTYPES[entry.dtype][1]
    if torch_dtype is None:
        raise MoePruneError(f"this torch cannot represent dtype {entry.dtype} of {entry.name!r}")
    if rows is None:
        ranges, shape = [(entry.begin, entry.end)], entry.shape
    else:
        rows = list(rows)
        ranges, shape = row_ranges(entry, rows), (len(rows), *entry.shape[1:])
    return read_ranges(entry.file, ranges, torch_dtype, shape)


def read_ranges(path: Path, ranges: Iterable[tuple[int, int]], torch_dtype: torch.dtype,
                shape: tuple[int, ...]) -> torch.Tensor:
    """The bytes of `ranges` (absolute file offsets), concatenated, as a fresh CPU tensor of `shape`.

    Read unbuffered into an uninitialised tensor: a zero-filled `bytearray` and Python's read buffer each cost one
    more pass over the bytes (one decoder layer of the benchmark checkpoint, 358 MB from the page cache: 0.33-0.45 s
    that way, 0.25 s this way)."""
    ranges = list(ranges)
    out = torch.empty(sum(e - b for b, e in ranges), dtype=torch.uint8)
    if not out.numel():
        return torch.empty(shape, dtype=torch_dtype)
    _fill(path, ranges, memoryview(out.numpy()))
    return out.view(torch_dtype).reshape(shape)


def read_into(entry, out: torch.Tensor) -> None:
    """Read one checkpoint tensor's bytes straight into `out`: a contiguous CPU tensor (or a contiguous slice of a
    larger one) of the tensor's shape and dtype. `entry`: a `TensorEntry`, or a view of one made of byte ranges of
    its file (`OutTensor`; `read_ahead.places`). No intermediate copy (`io/lazy_direct.py`)."""
    torch_dtype = DTYPES[entry.dtype][1]
    where = places(entry)
    if where is None:
        raise MoePruneError(f"{entry.name}: no byte ranges of a file to read from ({type(entry).__name__})")
    if out.dtype != torch_dtype or tuple(out.shape) != tuple(entry.shape) or not out.is_contiguous() \
            or out.device.type != "cpu":
        raise MoePruneError(f"{entry.name}: cannot read {entry.dtype} {list(entry.shape)} into a "
                            f"{'contiguous ' if out.is_contiguous() else 'non-contiguous '}{out.dtype} "
                            f"{list(out.shape)} tensor on {out.device}")
    if out.numel():
        _fill(where[0], list(where[1]), memoryview(out.reshape(-1).view(torch.uint8).numpy()))


def _fill(path: Path, ranges: list[tuple[int, int]], view: memoryview) -> None:
    """Read the bytes of `ranges` (absolute file offsets), one after the other, into `view`."""
    with open(path, "rb", buffering=0) as f:
        pos = 0
        for b, e in ranges:
            f.seek(b)
            while b < e:  # a raw read may return fewer bytes than asked
                n = f.readinto(view[pos : pos + e - b])
                if not n:
                    raise MoePruneError(f"{path} ended at byte {b}, before {e}: was it truncated while being read?")
                pos, b = pos + n, b + n


def row_ranges(entry: TensorEntry, rows: list[int], num_rows: int | None = None) -> list[tuple[int, int]]:
    """Absolute byte ranges of the given rows, the tensor's bytes seen as `num_rows` equal rows (default: dim 0),
    adjacent rows merged."""
    row_bytes = entry.nbytes // (num_rows or entry.shape[0])
    out: list[tuple[int, int]] = []
    for r in rows:
        b = entry.begin + r * row_bytes
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + row_bytes)
        else:
            out.append((b, b + row_bytes))
    return out


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its name, dtype, shape, and the source byte ranges to concatenate."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Path
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(e - b for b, e in self.ranges)

    def read(self) -> torch.Tensor:
        """The tensor this describes, read from its source's byte ranges only (a fresh CPU tensor)."""
        torch_dtype = DTYPES[self.dtype][1]
        if torch_dtype is None:
            raise MoePruneError(f"this torch cannot represent dtype {self.dtype} of {self.name!r}")
        return read_ranges(self.source, self.ranges, torch_dtype, self.shape)


def write_file(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file by copying byte ranges; memory use is one COPY_CHUNK buffer. Returns bytes."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        assert t.nbytes == math.prod(t.shape) * DTYPES[t.dtype][0], t.name
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data block aligned to 8 bytes, as safetensors does
    buf = bytearray(COPY_CHUNK)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        handles: dict[Path, object] = {}
        try:
            for t in in_windows(tensors):  # the next window's bytes are read in the background (`io/read_ahead`)
                src = handles.get(t.source) or handles.setdefault(t.source, open(t.source, "rb"))
                for b, e in t.ranges:
                    copy_range(src, out, b, e, buf)
        finally:
            for h in handles.values():
                h.close()
        out.flush()
        os.fsync(out.fileno())
    return 8 + len(blob) + offset


def copy_range(src, dst, begin: int, end: int, buf: bytearray) -> None:
    """Bytes [begin, end) of the open file `src` appended at `dst`'s position: in the kernel
    (`os.copy_file_range`, no pass through user memory) where the platform and both files allow it, else through
    `buf`. Measured here (ext4, 1.8 GB of a benchmark shard, page cache dropped): 1.1-1.3 s in the kernel against
    2.4-5.5 s through a 16 MiB buffer; NAEE 25 % on the 24-layer benchmark checkpoint copies 6.4 GB this way."""
    global _KERNEL_COPY
    if _KERNEL_COPY and end > begin:
        try:
            dst.flush()
            at, pos = begin, dst.tell()
            while at < end:  # may copy fewer bytes than asked
                n = os.copy_file_range(src.fileno(), dst.fileno(), end - at, at, pos)
                if not n:
                    raise MoePruneError(f"{src.name}: unexpected end of file while copying")
                at, pos = at + n, pos + n
            dst.seek(pos)
            return
        except (OSError, io.UnsupportedOperation) as exc:  # EXDEV, ENOSYS, EINVAL, EOPNOTSUPP, a non-file stream ...
            logger.debug("copy_file_range refused (%s); copying through a buffer from now on", exc)
            _KERNEL_COPY = False  # dst is still where it was (the kernel wrote at given offsets): the buffered
            # copy below rewrites whatever part the kernel had copied
    view = memoryview(buf)
    src.seek(begin)
    remaining = end - begin
    while remaining:
        n = src.readinto(view[: min(remaining, len(buf))])
        if not n:
            raise MoePruneError(f"{src.name}: unexpected end of file while copying")
        dst.write(view[:n])
        remaining -= n

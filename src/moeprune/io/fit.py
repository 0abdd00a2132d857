"""Does a checkpoint fit in memory? The automatic choice between loading it whole and one decoder layer at a time.

    need(ckpt, dtype)  = Σ_tensors numel · bytes(dtype they load in)          (quantized weights: dequantized)
    available()        = min(MemAvailable, cgroup limit − cgroup usage)       (cgroup v2 memory.max or v1)
    lazy               = need · HEADROOM + RESERVE > available()

`--lazy` forces layer by layer, `--no-lazy` forbids it; without either, `choose_lazy` decides and logs why.
HEADROOM covers what a whole-model load holds besides the weights (transformers' conversion temporaries while
fused experts are built, the activations of a batch); RESERVE is what the rest of the process needs.
"""

from __future__ import annotations

import re
from pathlib import Path

from moeprune.io.safetensors_io import FLOAT_DTYPES
from moeprune.log import logger

HEADROOM = 1.3
RESERVE = 1 << 30


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _cgroup_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup still allows (limit − usage), or None when unlimited / unknown."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: memory.max / memory.current, mounted at root or root/unified
            for base in (Path(root), Path(root) / "unified"):
                limit, used = _read_int(base / path.lstrip("/") / "memory.max"), None
                if limit is not None:
                    used = _read_int(base / path.lstrip("/") / "memory.current") or 0
                    rooms.append(limit - used)
                    break
        elif "memory" in controllers.split(","):  # cgroup v1: page cache counts in usage but is reclaimable
            base = Path(root) / "memory" / path.lstrip("/")
            limit = _read_int(base / "memory.limit_in_bytes")
            if limit is not None and limit < 1 << 60:
                rss = _v1_rss(base / "memory.stat")
                rooms.append(limit - (rss if rss is not None else _read_int(base / "memory.usage_in_bytes") or 0))
    return min(rooms) if rooms else None


def _v1_rss(stat: Path) -> int | None:
    try:
        fields = dict(line.split() for line in stat.read_text().splitlines() if line.count(" ") == 1)
    except OSError:
        return None
    return int(fields.get("total_rss", fields.get("rss", 0))) if fields else None


def available(meminfo: str = "/proc/meminfo") -> int:
    """Bytes this process can still allocate: the smaller of MemAvailable and its cgroup's room."""
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path(meminfo).read_text(), re.M)
        free = int(m.group(1)) * 1024 if m else None
    except OSError:
        free = None
    room = _cgroup_room()
    known = [v for v in (free, room) if v is not None]
    return min(known) if known else 1 << 62


def loaded_bytes(ckpt, dtype: str = "auto") -> int:
    """Bytes the model occupies once loaded: every tensor at the dtype it loads in. FP8 / MXFP4 weights are
    dequantized on load (to bf16, or `dtype`), so they count at 2 bytes (4 for float32) per value; an MXFP4 byte
    holds two values; scale tensors are dropped."""
    from moeprune.io.stock import parse_dtype

    want = None if parse_dtype(dtype) == "auto" else parse_dtype(dtype).itemsize
    total = 0
    for e in ckpt.entries:
        numel = 1
        for d in e.shape:
            numel *= d
        if e.name.endswith(("_scale_inv", "_scales", ".weight_scale")):
            continue
        if e.dtype.startswith("F8"):
            total += numel * (want or 2)
        elif e.name.endswith("_blocks"):
            total += 2 * numel * (want or 2)
        else:
            total += numel * want if want and e.dtype in FLOAT_DTYPES else e.nbytes  # floats: cast to `want` on load
    return total


def choose_lazy(flag: bool | None, ckpt, dtype: str = "auto", what: str = "the model") -> bool:
    """`flag` when given (--lazy / --no-lazy); else layer by layer iff the loaded model would not fit.
    Remote-code models are always loaded whole (`io/remote.py`)."""
    from moeprune.io.remote import is_remote, refuse_lazy
    from moeprune.quant.load import refuse_mixed_lazy

    if flag:
        refuse_lazy(ckpt.config_dict)
        refuse_mixed_lazy(ckpt.config_dict, str(ckpt.path))
    if flag is not None:
        return flag
    if is_remote(ckpt.config_dict):
        return False
    need, room = loaded_bytes(ckpt, dtype), available()
    lazy = need * HEADROOM + RESERVE > room
    if lazy:
        refuse_mixed_lazy(ckpt.config_dict, f"{ckpt.path} does not fit in memory ({_size(need)} loaded), but it")
    logger.info("%s needs ~%s loaded, %s available: %s (--lazy / --no-lazy to choose)", what, _size(need),
                _size(room), "one decoder layer at a time" if lazy else "loading it whole")
    return lazy


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"

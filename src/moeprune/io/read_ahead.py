"""Read-ahead: the next decoder layer's bytes come into the page cache while the current layer computes.

A layer-by-layer run reads layer i (`io/lazy.py`), computes with it, then reads layer i + 1. From a cold page
cache each read runs at the disk's speed (0.5-1 GB/s here: 0.4-0.7 s for one 358 MB layer of the 24-layer
benchmark checkpoint) and nothing is computed meanwhile. After reading layer i, `LazyModel` asks the kernel for
the layer it will read next with

    posix_fadvise(fd, at, 128 KiB, POSIX_FADV_WILLNEED)   for every 128 KiB piece of its merged byte ranges

(Linux reads at most max(read_ahead_kb, max_sectors_kb) of one call and drops the rest without saying so),
issued on a background thread (a call may block while the kernel queues the reads). The kernel then reads those
ranges into its page cache while layer i computes, and layer i + 1's own read copies from memory (3-3.7 GB/s).
The pages are page cache, not the process's memory: resident memory is unchanged, and under memory pressure (or a
memory cgroup's limit) the kernel may drop them, in which case the read goes to the disk as before; a layer larger
than half the memory left is not asked for at all. It is advice: the bytes read, and so every result, are the same
with or without it; a platform without `posix_fadvise` or a file system that refuses it only loses the overlap.

A copy of byte ranges (`io/safetensors_io.write_file`: streaming expert removal, the export's untouched tensors)
reads ahead the same way, one window of `WINDOW` bytes ahead of the one it copies (`in_windows`).

Which layer comes next is guessed from the last two reads (`next_layer`): calibration, the export and verify go
up the layers, HEAPr's backward pass goes down them (a wrong guess costs one layer's disk reads in the background).
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from moeprune.log import logger

CHUNK = 128 << 10  # one WILLNEED call's piece: the smallest default read-ahead (module docstring)
WINDOW = 64 << 20  # a byte-range copy advises this much ahead of what it copies (`in_windows`)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    """In a forked child the pool's thread does not exist: start a new pool there when one is needed."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def next_layer(previous: int | None, current: int, count: int) -> int | None:
    """The layer a run that read `previous` then `current` will read next: one further in the same direction
    (down after current = previous - 1, else up), or the other way at the first or last layer (HEAPr's backward
    pass reads the last layer again, then goes down); None for a one-layer model."""
    step = -1 if previous is not None and current == previous - 1 else 1
    for nxt in (current + step, current - step):
        if 0 <= nxt < count:
            return nxt
    return None


def places(t: object) -> tuple[Path, tuple[tuple[int, int], ...]] | None:
    """(file, its [begin, end) byte ranges, in order) of a checkpoint tensor: a `TensorEntry` (`file`, `begin`,
    `end`) or a view made of ranges of a source file (`source`, `ranges`, e.g. `OutTensor`); None for anything
    else (a tensor computed in memory has no bytes on disk)."""
    if hasattr(t, "file") and hasattr(t, "begin"):
        return Path(t.file), ((t.begin, t.end),)
    if hasattr(t, "source") and hasattr(t, "ranges"):
        return Path(t.source), tuple(t.ranges)
    return None


def byte_ranges(tensors: Iterable[object]) -> dict[Path, list[tuple[int, int]]]:
    """file -> sorted, merged [begin, end) byte ranges of the given checkpoint tensors (`places`; the others are
    skipped)."""
    spans: dict[Path, list[tuple[int, int]]] = defaultdict(list)
    for t in tensors:
        if (where := places(t)) is not None:
            spans[where[0]].extend(where[1])
    merged: dict[Path, list[tuple[int, int]]] = {}
    for path, ranges in spans.items():
        out: list[tuple[int, int]] = []
        for b, e in sorted(r for r in ranges if r[1] > r[0]):
            if out and b <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((b, e))
        merged[path] = out
    return merged


def advise(ranges: dict[Path, list[tuple[int, int]]]) -> None:
    """POSIX_FADV_WILLNEED on every range (synchronously); errors are logged and ignored (advice only). Nothing is
    asked for when the bytes exceed half of what this process may still use (`io/fit.available`: MemAvailable, or
    its memory cgroup's room): pages read that early would be dropped again before their turn, and read twice."""
    from moeprune.io.fit import available  # here: io/fit imports io/safetensors_io, which imports this module

    size = sum(e - b for spans in ranges.values() for b, e in spans)
    if size > available() // 2:
        logger.debug("read-ahead skipped: %d bytes, more than half of the memory left", size)
        return
    for path, spans in ranges.items():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            logger.debug("read-ahead: cannot open %s: %s", path, err)
            continue
        try:
            for b, e in spans:
                for at in range(b, e, CHUNK):
                    os.posix_fadvise(fd, at, min(CHUNK, e - at), os.POSIX_FADV_WILLNEED)
        except OSError as err:
            logger.debug("read-ahead refused on %s: %s", path, err)
        finally:
            os.close(fd)


def advise_later(ranges: dict[Path, list[tuple[int, int]]]) -> Future | None:
    """`advise(ranges)` on the read-ahead thread (one for the process); None where the platform has no
    posix_fadvise or there is nothing to advise."""
    global _POOL
    if not ranges or not hasattr(os, "posix_fadvise"):
        return None
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeprune-read-ahead")
    return _POOL.submit(advise, ranges)


def in_windows(tensors: Sequence, window: int = WINDOW) -> Iterator:
    """`tensors` (with file byte ranges and `nbytes`: `TensorEntry`, `OutTensor`) one by one, in order, cut into
    consecutive windows of at least `window` bytes: the first window is advised at once, and each window's first
    tensor advises the next window, so the disk reads one window ahead of the copy (at most two windows in the page
    cache)."""
    groups: list[list] = [[]]
    size = 0
    for t in tensors:
        if size >= window:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if groups[0]:
        advise_later(byte_ranges(groups[0]))
    for j, group in enumerate(groups):
        if j + 1 < len(groups):
            advise_later(byte_ranges(groups[j + 1]))
        yield from group

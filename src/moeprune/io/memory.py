"""Give freed host memory back to the OS while a model is processed layer by layer (glibc only; a no-op elsewhere).

Layer-by-layer work allocates and frees the same large buffers once per decoder layer (each expert's tensors as
read, the stacked fused tensors, activations). glibc serves allocations below its mmap threshold from the heap,
and raises that threshold dynamically (up to 32 MB) after every large free, so after the first layer a layer's
~1 MB expert tensors land in the heap, which fragments and is rarely returned: resident memory climbs to several
layers' worth. `release_freed_memory()` fixes the threshold at 128 KiB (which also disables the dynamic raise,
so large buffers are mmapped and unmapped when freed) and `trim()` returns free heap pages after each layer.
Measured on the 8.6 GB benchmark checkpoint (benchmarks/big_model.py, plain layer-by-layer forward, one layer
0.36 GB): peak RSS 2.44 GB with glibc's defaults, 1.64 GB with the fixed threshold.

The price is a fresh page fault for every page of every large temporary. A loop that allocates and frees the same
large temporaries thousands of times (NAEE's batched router calls: ~256 MiB each) runs under
`reuse_freed_memory()`, which lets them come from the heap and be reused, then restores the threshold and trims
(NAEE at E=128, 2 048 tokens: precompute 9.8 → 7.1 s, search 134 → 197 evaluations/s measured).

With the mmap threshold fixed, glibc's trim threshold stays at 128 KiB, so a large temporary freed at the top of
the heap goes straight back to the OS and the next one faults its pages in again: the reuse only works for
temporaries freed below a live allocation. `reuse_freed_memory(keep_top=True)` raises the trim threshold too.
One M-SMoE layer shaped like the benchmark checkpoint (128 experts, 32 aligned pairs) merges in 2.06 s with 69 k
page faults inside such a context, 4.34 s with 708 k outside (`python benchmarks/memory_reuse.py`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024  # both thresholds, once fixed (a fixed mmap threshold also stops the trim threshold's raise)
TRIM_WHILE_REUSING = (1 << 31) - 1  # inside `reuse_freed_memory(keep_top=True)` (mallopt takes an int)
REUSE_THRESHOLD = 1 << 30  # inside `reuse_freed_memory`: temporaries up to 1 GiB come from the heap
# a layer's batch loop (`calibration/engine.run_one`): per-expert temporaries (eager experts) up to 4 MiB reuse
# the last batch's pages; larger ones stay mmapped so the heap does not hold them. Measured, one thread, float32
# compute: the plain 24-layer forward 116 -> 113 s at 1.43 -> 1.46 GB peak RSS; HEAPr 25 % on a 4-layer copy of the
# benchmark checkpoint 93.8 -> 82.8 s (15.5 M -> 11.4 M page faults) with its backward loop reusing too, but on 24
# layers that backward reuse raised HEAPr's peak from 2.02 to 2.16 GB for no clear gain (3.91x vs 4.01x the
# forward), so HEAPr's backward does not reuse. 32 MiB saved more (HEAPr 76.7 s on 4 layers) but held 1.81 GB in
# the 24-layer forward.
COMPUTE_REUSE = 4 << 20
_FIXED: list[bool] = []  # [True] once `release_freed_memory` fixed the threshold in this process
_REUSING: list[int] = []  # thresholds of the `reuse_freed_memory` contexts now open, innermost last
_KEEPING: list[bool] = []  # [True] while a `keep_top` context holds the trim threshold raised


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@functools.cache
def release_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (once per process); False where there is no glibc."""
    libc = _libc()
    fixed = bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)
                 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    if fixed:
        _FIXED.append(True)
    return fixed


@contextmanager
def reuse_freed_memory(threshold: int = REUSE_THRESHOLD, keep_top: bool = False) -> Iterator[None]:
    """Inside, allocations up to `threshold` come from the heap and freed ones are reused; on exit the threshold
    of the enclosing context (or the fixed one) is back, and leaving the outermost context trims the heap. A no-op
    unless `release_freed_memory` fixed the threshold in this process (glibc's dynamic default already reuses), and
    inside a context whose threshold is at least as large.

    keep_top: also keep the heap's free top (glibc's trim threshold raised) until the outermost context is left, so
    a temporary freed at the top is reused too. Only where measured: in the layer merge it halves the time, but in
    the statistics passes (the batch loop, `column_sq`) it raised CAMERA-P's and a recipe's peak RSS on 24 layers
    from 1.5 to 1.9 GB and from 1.8 to 2.4 GB."""
    libc = _libc()
    outer = _REUSING[-1] if _REUSING else THRESHOLD
    if not _FIXED or libc is None or threshold <= outer or not libc.mallopt(M_MMAP_THRESHOLD, threshold):
        yield  # inside a wider reuse already: nothing to change (and nothing to restore early)
        return
    kept = keep_top and not _KEEPING
    if kept:
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_WHILE_REUSING)
        _KEEPING.append(True)
    _REUSING.append(threshold)
    try:
        yield
    finally:
        _REUSING.pop()
        libc.mallopt(M_MMAP_THRESHOLD, outer)
        if kept:
            _KEEPING.pop()
            libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD)
        if not _REUSING:
            libc.malloc_trim(0)


def trim() -> None:
    """Return the heap's free pages to the OS (after a layer is released)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

"""Surgery in place on buffers nothing else reads: a decoder layer the lazy loader read for one visit.

Removing experts or neurons makes every fused expert tensor smaller. In memory that means a new tensor of the
kept rows and the old one freed. A layer read by the lazy loader (`io/lazy.py` `LazyModel.layer`) holds its fused
expert tensors in buffers the loader allocated for that visit alone (`io/lazy_direct.read_direct`); they are
released when the visit ends, after the layer is written or computed. There the kept rows are moved to the front
of their own buffer and the parameter becomes a view of that front: no new allocation, so none of its page faults
(layer-by-layer runs map every large buffer fresh, `io/memory.py`). On the 8.6 GB benchmark checkpoint (one layer
0.36 GB) the copies took 0.1-0.5 s per layer in an M-SMoE export and 0.45 s in a HEAPr export
(`benchmarks/RESULTS.md`, session 29).

    with scratch(tensors):        inside, these tensors' storages may be rewritten (the loader's own buffers)
    rebuild_rows(t, n, row)       out [n, ...] with out[e] = row(e): in place when t is scratch, else a new tensor

In place, row e's elements go to t's flat elements [e·S', (e+1)·S') (S' = one output row's size ≤ S = one row of
t), so writing row e touches rows ≤ e of t only. That is safe for `row` that reads rows ≥ e of t only, e.g.
    expert removal:  row(j) = t[kept[j]] with kept ascending (kept[j] ≥ j; no later row reads row j);
    neuron removal:  row(e) = a gather from t[e] (a new tensor, read before row e is written).
Callers that cannot promise that pass `in_place=False`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_SCRATCH: ContextVar[frozenset[int]] = ContextVar("moeprune_scratch_storages", default=frozenset())


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@contextmanager
def scratch(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside, surgery may rewrite the storages of `tensors` in place (see the module docstring)."""
    keys = frozenset(_key(t) for t in tensors if t.device.type == "cpu" and not t.is_meta)
    token = _SCRATCH.set(_SCRATCH.get() | keys)
    try:
        yield
    finally:
        _SCRATCH.reset(token)


def is_scratch(t: torch.Tensor) -> bool:
    """Whether t's storage is one that an open `scratch` context lets surgery rewrite."""
    keys = _SCRATCH.get()
    return bool(keys) and not t.is_meta and _key(t) in keys


def rebuild_rows(t: torch.Tensor, n: int, row: Callable[[int], torch.Tensor], in_place: bool = True) -> torch.Tensor:
    """[n, *row(0).shape]: out[e] = row(e), computed in order e = 0 .. n-1 (every row the same shape).

    In place (t scratch and contiguous, `in_place`, at most t's rows, none larger): out is a view of t's first n·S'
    elements, written row by row (module docstring for what `row` may read). Else a new tensor."""
    if n == 0:
        return t.new_empty((0, *t.shape[1:]))
    first = row(0)
    size = first.numel()
    if in_place and n <= t.shape[0] and size <= t[0].numel() and t.is_contiguous() and is_scratch(t):
        out = t.view(-1)[: n * size].view(n, *first.shape)
    else:
        out = t.new_empty((n, *first.shape))
    for e in range(n):
        r = first if e == 0 else row(e)
        if r.data_ptr() != out[e].data_ptr():  # in place, an unmoved row (kept[e] == e) is already there
            out[e].copy_(r)
    return out


def keep_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] along dim 0 ([len(idx), ...]); in place when t is scratch and idx strictly ascending."""
    rows = idx.tolist()
    ascending = all(a < b for a, b in zip(rows, rows[1:], strict=False))
    return rebuild_rows(t, len(rows), lambda j: t[rows[j]], in_place=ascending)

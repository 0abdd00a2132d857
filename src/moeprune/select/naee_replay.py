"""The router's D-independent linear, replayed: NAEE's fast evaluator (`select/naee_evaluator.FastEvaluator`) runs the
layer's own router under each drop set's mask, and this mode serves the router's `F.linear` on the cached inputs
from one recorded result per chunk instead of recomputing the [c, H]×[H, E] product per evaluation."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class ReplayLinear(TorchFunctionMode):
    """Serves the router's `F.linear` on the cached router inputs from one recorded result per chunk.

    The router logits do not depend on D, so each evaluation replays them instead of redoing the [c, H]×[H, E]
    product; the router still runs every other op of its own code, and the mask mode (the inner mode) adds its
    mask to a copy. A call is served when its weight / bias are the router's own parameters or buffers (`params`:
    alive and unchanged during a search) and its input is a cached chunk x [c, H], or the evaluator's row buffer
    while it holds `rows_of` = (x, b): x repeated b times ([b·c, H]; served as the recorded [c, E] result repeated b
    times, which is exactly what b one-at-a-time calls get), or (x, index): the rows x[index] ([R, H], index [R]
    long; served as the recorded result's rows `index`: the incremental evaluator's affected tokens). Dtype
    conversions of those inputs and parameters inside the router (DeepSeek-V3 / GLM-4 compute their logits in
    float32) are followed for the duration of one router call, so such linears are replayed too (on x converted the
    same way). Any other linear is computed as usual."""

    CONVERT = frozenset({"type", "to", "float", "double", "half", "bfloat16"})

    def __init__(self, chunks: list[torch.Tensor], params: list[torch.Tensor]):
        super().__init__()
        self.chunks = {x.data_ptr(): x for x in chunks}
        self.params = {t.data_ptr(): t for t in params}
        self.cache: dict[tuple, torch.Tensor] = {}
        self.buffer: torch.Tensor | None = None  # the evaluator's row buffer
        # (x, b): the buffer's first b·c rows are x, b times; (x, index [R]): its first R rows are x[index]
        self.rows_of: tuple[torch.Tensor, int | torch.Tensor] | None = None
        self.derived: dict[int, tuple[torch.Tensor, tuple]] = {}  # converted copy's ptr -> (copy, its origin)

    def _origin(self, t: torch.Tensor) -> tuple | None:
        """("x", x, rows, dtype): x's rows (b: repeated b times; index [R]: x[index]), in dtype; ("p", param, dtype);
        None: not a replayable tensor."""
        ptr = t.data_ptr()
        if ptr in self.derived:
            copy, origin = self.derived[ptr]
            return origin if copy is t or (copy.shape == t.shape and copy.stride() == t.stride()
                                           and copy.dtype == t.dtype) else None
        if ptr in self.params:
            p = self.params[ptr]
            return ("p", p, p.dtype) if (t.shape, t.stride(), t.dtype) == (p.shape, p.stride(), p.dtype) else None
        if ptr in self.chunks:
            x = self.chunks[ptr]
            return ("x", x, 1, x.dtype) if (t.shape, t.stride(), t.dtype) == (x.shape, x.stride(), x.dtype) else None
        if self.buffer is not None and self.rows_of is not None and ptr == self.buffer.data_ptr():
            x, rows = self.rows_of
            n = rows * x.shape[0] if isinstance(rows, int) else rows.shape[0]
            ok = t.shape == (n, x.shape[1]) and t.is_contiguous() and t.dtype == x.dtype
            return ("x", x, rows, x.dtype) if ok else None
        return None

    def __exit__(self, *exc):
        self.derived.clear()  # converted copies are followed within one router call only
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.CONVERT and args and isinstance(args[0], torch.Tensor):
            out = func(*args, **kwargs)
            origin = self._origin(args[0])
            if origin is not None and isinstance(out, torch.Tensor) and out.data_ptr() != args[0].data_ptr() \
                    and out.shape == args[0].shape:
                self.derived[out.data_ptr()] = (out, (*origin[:-1], out.dtype))  # held: its address stays its own
            return out
        if name != "linear" or kwargs or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        rest = [a for a in args[1:] if a is not None]
        origins = [self._origin(t) if isinstance(t, torch.Tensor) else None for t in rest]
        source = self._origin(args[0])
        if source is None or source[0] != "x" or any(o is None or o[0] != "p" for o in origins):
            return func(*args, **kwargs)
        _, x, rows, dtype = source
        key = (x.data_ptr(), dtype, *((o[1].data_ptr(), o[2]) for o in origins))
        hit = self.cache.get(key)
        if hit is None:
            params = iter(o[1].to(o[2]) for o in origins)
            call = [x.to(dtype), *(next(params) if a is not None else None for a in args[1:])]
            hit = self.cache[key] = func(*call)  # [c, E]
        if not isinstance(rows, int):
            return hit.index_select(0, rows)  # [R, E]
        return hit.clone() if rows == 1 else hit.repeat(rows, 1)  # a copy: the router may write into what it gets

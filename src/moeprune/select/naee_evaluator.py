"""NAEE's fast evaluator: err(D) for a dropped set D from the precomputed G, A, ‖U‖² of `naee_outputs.py` (whose
module docstring gives the formula, the costs and the memory bounds): the layer's own router under the mask, then
gathers and float64 sums. The precompute and this evaluator were one file; split so each holds one purpose."""

from __future__ import annotations

import torch
from torch import nn

from moeprune.calibration.session import eager_experts
from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_experts, masked_rows
from moeprune.select.naee_fill import ready
from moeprune.select.naee_outputs import ExpertOutputs
from moeprune.select.naee_replay import ReplayLinear

EVAL_BYTES = 256 << 20  # bound on the temporaries of one batched router call (`FastEvaluator.many`)
ROW_ALIGN = 64  # router calls see a multiple of this many rows (`FastEvaluator`: no vector-tail rounding)


class FastEvaluator:
    """err(D) (module docstring) from precomputed `outputs`: the layer's own router under the mask (its
    D-independent logits replayed, `naee_replay.ReplayLinear`), gathers of G and A, float64 accumulation.

    `evaluator(D)` scores one set D (the router on each chunk of c tokens under the plain [E] mask,
    `models.masking.masked_experts`). `evaluator.many([D_1 … D_n])` scores n sets with one router call per chunk
    and group of b ≤ n sets: the chunk's inputs repeated b times ([b·c, H], a buffer filled once per chunk and
    call) under a per-row-block mask [b, E] (`models.masking.masked_rows`), then the gathers in token-major order
    ([c, b, k, k]: the b sets' indices into token t's G block are mostly the same, so they hit the same cache
    lines). b = max(1, ⌊`batch_bytes` / (c·(H·s_x + 16·E + 24·k² + 40·k))⌋) bounds the temporaries of one call
    to ≈ `batch_bytes` (default 256 MiB: router input copy, logits / probabilities, gathered indices and values);
    the buffer is part of that bound (`batch` sets b directly).

    Both give the same numbers up to float64 summation order: the router's rows are computed independently and its
    logits are the same recorded [c, E] result. To keep that true of its elementwise ops too (a vectorised kernel
    computes a tensor's last N mod V elements on a scalar path, e.g. sigmoid rounding differently there), the
    router always sees a multiple of `ROW_ALIGN` rows: each chunk's inputs are padded with copies of its last row,
    whose results are not read. (With several CPU threads a kernel's per-thread split can still move such
    boundaries; the tests run on one.)"""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, layer: int, outputs: ExpertOutputs,
                 batch_bytes: int = EVAL_BYTES, batch: int | None = None):
        self.model, self.adapter, self.layer, self.outputs = model, adapter, layer, outputs
        self.router = adapter.router(adapter.block(model, layer))
        self.k = adapter.top_k
        self.xs = [_pad_rows(x, ROW_ALIGN) for x in outputs.x]  # [c', H], c' = c rounded up to ROW_ALIGN
        self.replay = ReplayLinear(self.xs, [*self.router.parameters(), *self.router.buffers()])
        self.experts = adapter.experts(adapter.block(model, layer))  # fills slots on demand (`_scores`)
        c = max(x.shape[0] for x in self.xs)
        E, H = outputs.gram[0].shape[1], outputs.x[0].shape[1]
        per_row = H * outputs.x[0].element_size() + 16 * E + 24 * self.k ** 2 + 40 * self.k
        self.batch = batch or max(1, batch_bytes // (c * per_row))  # sets per router call in `many`

    def _route(self, x: torch.Tensor, rows: int, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(w [rows, k] float64, or in the router's own dtype when `raw`; idx [rows, k]) from the layer's router."""
        o = self.outputs
        routed = self.router(x[None] if o.router_rank == 3 else x, *o.router_args, **o.router_kwargs)
        w, idx = routed[1], routed[2]  # [rows, k] gate weights, [rows, k] expert indices (the model's own)
        if idx.shape != (rows, self.k) or w.shape != (rows, self.k):
            raise MoePruneError(f"router of layer {self.layer} returned indices of shape {tuple(idx.shape)}, "
                                f"expected [{rows}, {self.k}]: NAEE's fast evaluator cannot read it.")
        return (w if raw else w.double()), idx

    @staticmethod
    def _per_token(gram, cross, base, w, idx) -> torch.Tensor:
        """p_t = wᵀ G_t[i, i] w − 2 wᵀ A_t[i] per token row and set: w, idx [c, b, k] (idx: slots of G and A,
        `_scores`), base [c] (offset of each row's token block in G: rows may repeat or pick tokens) -> [c, b]
        (float64)."""
        w, idx = w.contiguous(), idx.contiguous()
        c, b, k = idx.shape
        E = gram.shape[1]  # slots per token: the experts, or C candidates
        a = cross.view(-1).index_select(0, ((base // E)[:, None, None] + idx).view(-1)).view(c, b, k)  # ⟨U, y_i⟩
        rows = base[:, None, None] + idx * E  # [c, b, k] offset of row i_s of token t's G block
        flat = rows[..., :, None] + idx[..., None, :]  # [c, b, k, k]
        g = gram.view(-1).index_select(0, flat.view(-1)).view(c, b, k, k)  # ⟨y_{i_s}, y_{i_s'}⟩
        quad = (torch.matmul(g, w[..., None])[..., 0] * w).sum(2)  # [c, b] wᵀ G w
        return quad - 2 * (w * a).sum(2)

    def _scores(self, chunk: int, tokens: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """p_t per row and set (`_per_token`) of rows of tokens [r] of chunk `chunk` routed (w, idx [r, b, k]) ->
        [r, b] float64; with candidates, the slots these routes reach are assigned and filled first
        (`naee_fill.ready`, which may widen the chunk's G and A)."""
        o = self.outputs
        if o.slots:
            with eager_experts(self.model):
                idx = ready(o, chunk, tokens, idx, self.experts, self.k)
        gram = o.gram[chunk]
        base = tokens * gram.shape[1] ** 2  # [r] offset of each row's token block in G
        return self._per_token(gram, o.cross[chunk], base, w, idx)

    def _route_set(self, x: torch.Tensor, dropped, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The route of a cached chunk x [c', H] with `dropped` masked: (w, idx) [c', k] each (`_route`)."""
        with masked_experts(self.model, self.adapter, {self.layer: list(dropped)}), self.replay:
            return self._route(x, x.shape[0], raw)  # one router call per entry: converted copies released after

    def _buffer(self, rows: int) -> torch.Tensor:
        """The replay's row buffer ([≥ rows, H], grown when needed)."""
        if self.replay.buffer is None or self.replay.buffer.shape[0] < rows:
            x0 = self.xs[0]
            self.replay.buffer = torch.empty(rows, x0.shape[1], dtype=x0.dtype, device=x0.device)
        return self.replay.buffer

    @torch.no_grad()
    def __call__(self, dropped: tuple[int, ...]) -> float:
        o = self.outputs
        err = torch.zeros((), dtype=torch.float64, device=o.gram[0].device)
        for i, x in enumerate(self.xs):
            c = o.gram[i].shape[0]
            w, idx = self._route_set(x, dropped)  # [c', k] each
            err += self._scores(i, torch.arange(c, device=idx.device), w[:c, None], idx[:c, None]).sum()
        return float(err) + o.target_sq

    @torch.no_grad()
    def many(self, drops: list[tuple[int, ...]]) -> list[float]:
        o, n = self.outputs, len(drops)
        if n == 0:
            return []
        errs = torch.zeros(n, dtype=torch.float64, device=o.gram[0].device)  # [n]
        b_max = min(self.batch, n)
        buffer = self._buffer(max(x.shape[0] for x in self.xs) * b_max)
        for i, x in enumerate(self.xs):
            c, cp = o.gram[i].shape[0], x.shape[0]  # real tokens, padded rows
            tokens = torch.arange(c, device=x.device)
            buffer[:b_max * cp].view(b_max, cp, -1).copy_(x[None].expand(b_max, cp, -1))  # x, b_max times
            for s0 in range(0, n, b_max):
                group = drops[s0:s0 + b_max]
                b = len(group)
                self.replay.rows_of = (x, b)
                try:
                    with self.replay, masked_rows(self.model, self.adapter, self.layer, group):
                        w, idx = self._route(buffer[:b * cp], b * cp)  # [b·c', k] each, set-major rows
                finally:
                    self.replay.rows_of = None
                w = w.view(b, cp, self.k)[:, :c].transpose(0, 1)  # [c, b, k]
                idx = idx.view(b, cp, self.k)[:, :c].transpose(0, 1)  # [c, b, k]
                errs[s0:s0 + b] += self._scores(i, tokens, w, idx).sum(0)
        return (errs + o.target_sq).tolist()


def _pad_rows(x: torch.Tensor, align: int) -> torch.Tensor:
    """x [c, H] -> [c', H], c' = c rounded up to a multiple of `align`, the new rows copies of x's last row."""
    pad = -x.shape[0] % align
    return x if pad == 0 else torch.cat([x, x[-1:].expand(pad, -1)])


def fast_evaluator(model: nn.Module, adapter: MoEAdapter, layer: int, outputs: ExpertOutputs,
                   batch_bytes: int = EVAL_BYTES, batch: int | None = None) -> FastEvaluator:
    """The evaluator of `reconstruction.search` for this layer: callable on one D, and `.many` (see
    `FastEvaluator`)."""
    return FastEvaluator(model, adapter, layer, outputs, batch_bytes, batch)

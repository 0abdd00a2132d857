"""Prune-as-you-go re-runs without recomputing the experts that masking does not touch.

Prune-as-you-go (`session.collect(decide=...)`) re-runs decoder layer i with the dropped experts masked in the
model's own router, so that layer i+1 is calibrated on what the pruned layer gives. The MoE block is row-wise: a
token's routed-experts output o_t = Σ_s w_s(t)·f_{i_s(t)}(x_t) depends only on its own input row x_t and its own
route (i(t), w(t)), the [T, k] indices and gate weights the block hands its experts module. Most tokens keep their
route when a few rarely chosen experts are masked, and attention is deterministic, so they reach the experts module
with the same x_t, i(t), w(t) as in the calibration pass, and their output is the one computed then.

`ExpertReplay` records the experts module's calls during the calibration pass of a layer (a forward hook): per call
a fingerprint of each input row, the route (i, w) and the output [T, H] (kept on the host, like `BlockIO`). During
the masked re-run it stands in for the experts module's forward: a row whose fingerprint, indices and weights are
all bitwise those of the recorded call gets the recorded output row; every other row (the affected tokens) runs the
model's own experts forward, on those rows only. The rest of the layer (attention, router, shared experts, norms)
runs as before, so nothing is assumed about how the layer combines the block's output.

Row fingerprint: h(x) = Σ_j r_j·bits(x_j) mod 2⁶⁴ with fixed odd random r_j (bits: the element's integer view).
Equal rows give equal h; a row that differs in one element differs in h (r_j odd is invertible mod 2⁶⁴), and rows
differing in several elements collide with probability ≈ 2⁻⁶⁴. Costs T·H integer multiply-adds per call.

Not replayed (the re-run computes every row, as before): experts modules that take the hidden states only (blocks
that pre-scale them, `stats/prescaled.py`), calls with extra arguments, and any call whose shapes or count differ
from the recording. Cost per layer of the re-run: attention, router and shared experts on every token, the routed
experts on the affected tokens only (those whose top-k held a dropped expert, or whose weights changed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from moeprune.models.forward_patch import forward_replaced
from moeprune.stats.prescaled import is_prescaled

_SEED = 0x5EED


@dataclass
class _Call:
    """One recorded experts call: fingerprint [T] int64, indices [T, k], weights [T, k], output [T, H] (host)."""

    shape: torch.Size  # the hidden states' shape as given ([T, H], or [B, S, H])
    prints: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor
    output: torch.Tensor


@cache
def _multipliers(width: int) -> torch.Tensor:
    """[width] fixed odd random int64 r_j (host; drawn once per width, not per call)."""
    gen = torch.Generator().manual_seed(_SEED)
    return torch.randint(-(2**62), 2**62, (width,), generator=gen, dtype=torch.int64) * 2 + 1


def row_prints(x: torch.Tensor) -> torch.Tensor:
    """[T] int64 fingerprints of the rows of x [T, H] (module docstring): Σ_j r_j·bits(x_tj) mod 2⁶⁴."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    r = _multipliers(x.shape[-1]).to(x.device)  # [H]
    return (x.contiguous().view(bits).long() * r).sum(dim=-1)  # int64 arithmetic wraps mod 2⁶⁴


class ExpertReplay:
    """Records one layer's experts calls (`record`), then serves a masked re-run of that layer (`replaying`).

    `supported` is False where the experts' forward takes the hidden states only; then nothing is recorded and
    `replaying` changes nothing. After a re-run, `rows` / `recomputed` count the rows served and recomputed."""

    def __init__(self, experts: nn.Module):
        self.experts = experts
        self.supported = not is_prescaled(experts)
        self.calls: list[_Call | None] = []  # None: a call that cannot be replayed
        self.rows = self.recomputed = 0

    def _hook(self, module, args, kwargs, output) -> None:
        if len(args) != 3 or kwargs or not isinstance(output, torch.Tensor):
            self.calls.append(None)
            return
        hidden, index, weights = args
        T = index.shape[0]
        flat = hidden.detach().reshape(T, -1)  # [T, H]
        out = output.detach().reshape(T, -1).to("cpu", copy=True)  # a copy: the block may add to it in place
        self.calls.append(_Call(hidden.shape, row_prints(flat), index.detach().clone(), weights.detach().clone(), out))

    @contextmanager
    def record(self) -> Iterator[None]:
        """Record every call of the experts module inside (the calibration pass of the layer)."""
        self.calls.clear()
        handle = self.experts.register_forward_hook(self._hook, with_kwargs=True) if self.supported else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """The experts module serves the recorded rows that match and recomputes the others (module docstring)."""
        if not self.supported or not self.calls:
            yield
            return
        pending = iter(self.calls)
        self.rows = self.recomputed = 0

        def serving(before):
            return lambda *args, **kwargs: forward(before, *args, **kwargs)

        def forward(before, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            call = next(pending, None)
            T = top_k_index.shape[0]
            if (call is None or args or kwargs or hidden_states.shape != call.shape
                    or top_k_index.shape != call.index.shape or top_k_weights.dtype != call.weights.dtype):
                self.rows += T
                self.recomputed += T
                return before(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            flat = hidden_states.reshape(T, -1)  # [T, H]
            same = ((row_prints(flat) == call.prints) & (top_k_index == call.index).all(dim=-1)
                    & (top_k_weights == call.weights).all(dim=-1))  # [T]
            out = call.output.to(flat.device, copy=True)  # [T, H]: the recording stays as it was
            rows = (~same).nonzero().view(-1)  # [R]
            if rows.numel():
                part = before(flat.index_select(0, rows), top_k_index.index_select(0, rows),
                              top_k_weights.index_select(0, rows))  # [R, H]
                out.index_copy_(0, rows, part.reshape(rows.numel(), -1).to(out.dtype))
            self.rows += T
            self.recomputed += int(rows.numel())
            return out.view(*hidden_states.shape[:-1], out.shape[-1])

        with forward_replaced(self.experts, serving):
            yield

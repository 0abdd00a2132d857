"""Run a model with some experts masked out of routing, through the model's *own* router code.

This is the reference a pruned checkpoint must equal. While a router's forward runs, a TorchFunctionMode adds
-inf to the removed experts' columns of the outputs of the ops the routing kind names (`RoutingSpec.masked_ops`,
each one masked on every router call):

- linear (softmax_topk, topk_softmax, softmax_grouped, sigmoid_topk): the router logits (last dim E). softmax then
  gives them probability 0 (= softmax over the kept experts only) and top-k never picks them.
- sigmoid (sigmoid_grouped): the sigmoid scores. c = s + bias is then -inf for removed experts, so they never
  enter a group's top-2 score nor the top-k; the gate weights are gathered only from selected (kept) experts.
- linear and softmax (softmax_bias): the softmax runs over the kept experts only, and its output is -inf for the
  removed ones, so the selection bias cannot lift them into the top-k.

Everything else — renormalisation, group limits, scaling, biases, dtypes — is whatever the model's code does,
so no router is re-implemented here.

With Z extra router classes (LongCat-Flash's identity zero experts, the last Z columns) the mask is [E + Z] and
only ever masks expert columns: the zero experts stay routable, as in the pruned model.

`masked_rows` is the same with one mask per block of rows: G dropped sets for a router call on N = G·c rows, set g
masking rows g·c..(g+1)·c (NAEE scores G candidate sets in one router call on its cached inputs repeated G times);
`masked_row_blocks` takes the [G, E] masks themselves (G = N: one per row, `row_masks`: NAEE's incremental scoring
routes each affected token under its own child set).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.models.forward_patch import forward_replaced

_OPS = {"linear": {"linear"}, "sigmoid": {"sigmoid", "expit", "sigmoid_"}, "softmax": {"softmax", "_softmax"}}


class _ShiftColumns(TorchFunctionMode):
    """Adds `shifts[op]` to the outputs (last dim E) of each op in `shifts`, and counts the hits per op.

    A shift is [E] (added to every row) or [G, E] (row block g of G equal blocks of an [N, E] output gets row g):
    masking adds 0 / -inf, steering -inf / +strength."""

    def __init__(self, shifts: dict[str, torch.Tensor]):
        super().__init__()
        self.op_of = {name: op for op in shifts for name in _OPS[op]}  # torch function name -> shifted op
        self.shifts = shifts
        self.hits = dict.fromkeys(shifts, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = self.op_of.get(getattr(func, "__name__", ""))
        if op is None or not isinstance(out, torch.Tensor):
            return out
        shift = self.shifts[op]
        E = shift.shape[-1]
        if out.shape[-1] == E and shift.dim() == 1:
            self.hits[op] += 1
            return out + shift.to(device=out.device, dtype=out.dtype)
        if out.shape[-1] == E and out.numel() % shift.numel() == 0:  # [N, E], N = G·c rows
            self.hits[op] += 1
            blocks = shift.to(device=out.device, dtype=out.dtype)
            return (out.reshape(shift.shape[0], -1, E) + blocks[:, None, :]).view(out.shape)
        return out


def _mask(adapter: MoEAdapter, drop) -> torch.Tensor:
    """[E + Z]: -inf on the experts in `drop` (all < E), 0 elsewhere (the Z extra router classes included)."""
    if any(not 0 <= int(j) < adapter.num_experts for j in drop):
        raise MoePruneError(f"cannot mask {sorted(drop)}: experts are 0..{adapter.num_experts - 1}.")
    mask = torch.zeros(adapter.num_experts + getattr(adapter, "extra_classes", 0))  # duck-typed adapters: Z = 0
    mask[list(drop)] = float("-inf")
    return mask


@contextmanager
def _wrapped(router: nn.Module, ops: tuple[str, ...], mask: torch.Tensor) -> Iterator[dict]:
    """`router.forward` patched inside the context (`forward_replaced`: an earlier instance forward is restored);
    yields the counter of its calls, the calls in which every op was masked ("hits"), and each op's masked outputs
    ("ops")."""
    counter = {"calls": 0, "hits": 0, "ops": dict.fromkeys(ops, 0)}

    def make(original):
        def forward(*args, **kwargs):
            mode = _ShiftColumns(dict.fromkeys(ops, mask))
            with mode:
                out = original(*args, **kwargs)
            counter["calls"] += 1
            counter["hits"] += all(mode.hits.values())
            for op, n in mode.hits.items():
                counter["ops"][op] += n
            return out

        return forward

    with forward_replaced(router, make):
        yield counter


@contextmanager
def masked_experts(model: nn.Module, adapter: MoEAdapter, dropped: dict[int, list[int]]) -> Iterator[dict]:
    """Inside the context, experts `dropped[layer]` can never be routed to. Yields per-layer hit counters.

    Raises MoePruneError on exit if a router ran but one of the masked ops was not seen in one of its calls (the
    family's routing kind would then be wrong and the reference meaningless).
    """
    ops = adapter.routing().masked_ops
    counters: dict[int, dict] = {}
    with ExitStack() as patches:  # each router's forward back as it was on exit
        for layer, drop in dropped.items():
            if drop:
                router = adapter.router(adapter.block(model, layer))
                counters[layer] = patches.enter_context(_wrapped(router, ops, _mask(adapter, drop)))
        yield counters
    _check_hits(counters, ops)


@contextmanager
def masked_rows(model: nn.Module, adapter: MoEAdapter, layer: int, drops: list[tuple[int, ...]]) -> Iterator[dict]:
    """Inside the context, a router call of `layer` on N rows masks `drops[g]` on rows g·c..(g+1)·c, c = N / G
    (G = len(drops); N must be a multiple of G). Yields the layer's hit counter; raises as `masked_experts`."""
    with masked_row_blocks(model, adapter, layer, torch.stack([_mask(adapter, drop) for drop in drops])) as counter:
        yield counter


def row_masks(adapter: MoEAdapter, drop, extra: torch.Tensor) -> torch.Tensor:
    """[R, E + Z] masks (0 / -inf): every row masks the experts in `drop`, row r also expert `extra[r]` (extra [R]
    long) or experts `extra[r, :]` ([R, m]). `masked_row_blocks` with these masks routes R rows, row r as if
    D ∪ {extra[r]} were dropped."""
    if extra.numel() and not (0 <= int(extra.min()) and int(extra.max()) < adapter.num_experts):
        raise MoePruneError(f"cannot mask experts {sorted(set(extra.reshape(-1).tolist()))}: experts are "
                            f"0..{adapter.num_experts - 1}.")
    masks = _mask(adapter, drop).expand(extra.shape[0], -1).clone()  # [R, E + Z]
    masks.scatter_(1, extra.reshape(extra.shape[0], -1).cpu(), float("-inf"))
    return masks


@contextmanager
def masked_row_blocks(model: nn.Module, adapter: MoEAdapter, layer: int, masks: torch.Tensor) -> Iterator[dict]:
    """Inside the context, a router call of `layer` on N rows adds masks[g] ([G, E + Z], 0 / -inf: `_mask`,
    `row_masks`) to rows g·c..(g+1)·c of each masked op's output, c = N / G (G = N: one mask per row). Yields the
    layer's hit counter; raises as `masked_experts`."""
    ops = adapter.routing().masked_ops
    with _wrapped(adapter.router(adapter.block(model, layer)), ops, masks) as counter:
        yield counter
    _check_hits({layer: counter}, ops)


def _check_hits(counters: dict[int, dict], ops: tuple[str, ...]) -> None:
    silent = {layer: [op for op, n in c["ops"].items() if n < c["calls"]]
              for layer, c in counters.items() if c["calls"] and c["hits"] < c["calls"]}
    if silent:
        missed = sorted({op for names in silent.values() for op in names})
        raise MoePruneError(f"expert mask found no {' / '.join(repr(op) for op in missed)} output of width E in "
                            f"some calls of the routers of layers {sorted(silent)} (masked ops {ops})")


# ------------------------------------------------------------------------------------------- steering (MoTE)
# Additive: the functions above are untouched. A steering shift is one [E + Z] vector per masked op of the routing
# kind, added to that op's outputs inside the router's own forward:
#   "off" expert: -inf on every masked op (exactly what `masked_experts` adds: it can never be routed);
#   "on" expert:  +strength on the FIRST masked op only (`steer_op`): the router logits for every kind except
#                 sigmoid_grouped, where it is the sigmoid scores (the value the correction bias is added to).
# Selection, group limits, gate gathering, renormalisation and scaling then run as the family's code does them.


def steer_op(adapter: MoEAdapter) -> str:
    """The op whose output an "on" expert's strength is added to: linear (logits), or sigmoid for sigmoid_grouped."""
    return adapter.routing().masked_ops[0]


def steer_shifts(adapter: MoEAdapter, off, on: dict[int, float]) -> dict[str, torch.Tensor]:
    """{op: [E + Z] shift}: -inf on `off` experts for every masked op, +on[j] for expert j on `steer_op` only."""
    ops = adapter.routing().masked_ops
    both = set(off) & set(on)
    if both:
        raise MoePruneError(f"experts {sorted(both)} are both switched off and forced on; keep one action each.")
    shifts = {op: _mask(adapter, off) for op in ops}  # [E + Z] each, -inf on the experts switched off
    if on:
        _mask(adapter, on)  # range check
        shifts[steer_op(adapter)][list(on)] = torch.tensor([float(s) for s in on.values()])
    return shifts


class RouterShifts:
    """Persistent shifts on some routers (`shift_routers`); `remove()` restores each router's previous forward.
    Unlike `masked_experts` (checked on exit), every router call is checked at once: a call in which a shifted op
    was not seen raises (a model loaded with steering keeps it for its lifetime, so there is no exit to wait for).
    `calls[layer]` counts router calls."""

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}
        self._patches = ExitStack()  # `forward_replaced` per router: each previous forward back on `remove`

    def add(self, router: nn.Module, layer: int, shifts: dict[str, torch.Tensor]) -> None:
        self.calls[layer] = 0

        def make(original):  # original: the router's forward before (an instance patch, e.g. masked_experts)
            def forward(*args, **kwargs):
                mode = _ShiftColumns(shifts)
                with mode:
                    out = original(*args, **kwargs)
                missed = [op for op, n in mode.hits.items() if n == 0]
                if missed:
                    raise MoePruneError(f"steering found no {' / '.join(repr(op) for op in missed)} output of width "
                                        f"{next(iter(shifts.values())).shape[0]} in a call of the router of layer "
                                        f"{layer}; this family's routing kind is described wrongly.")
                self.calls[layer] += 1
                return out

            return forward

        self._patches.enter_context(forward_replaced(router, make))

    def remove(self) -> None:
        self._patches.close()  # last added first


def shift_routers(model: nn.Module, adapter: MoEAdapter, steer: dict[int, tuple[list[int], dict[int, float]]]
                  ) -> RouterShifts:
    """Steer the routers of `model` until `.remove()`: `steer[layer] = (off experts, {on expert: strength})`.
    Layers with nothing to do are left untouched (an empty plan changes nothing at all)."""
    handle = RouterShifts()
    try:
        for layer, (off, on) in steer.items():
            if not off and not on:
                continue
            handle.add(adapter.router(adapter.block(model, layer)), layer, steer_shifts(adapter, off, on))
    except BaseException:
        handle.remove()
        raise
    return handle


@contextmanager
def steered_experts(model: nn.Module, adapter: MoEAdapter, steer: dict[int, tuple[list[int], dict[int, float]]]
                    ) -> Iterator[RouterShifts]:
    """`shift_routers` for the duration of the context."""
    handle = shift_routers(model, adapter, steer)
    try:
        yield handle
    finally:
        handle.remove()

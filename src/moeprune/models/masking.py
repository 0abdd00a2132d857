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
masking rows g·c..(g+1)·c (NAEE scores G candidate sets in one router call on its cached inputs repeated G times).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter

_OPS = {"linear": {"linear"}, "sigmoid": {"sigmoid", "expit", "sigmoid_"}, "softmax": {"softmax", "_softmax"}}


class _MaskColumns(TorchFunctionMode):
    def __init__(self, ops: tuple[str, ...], mask: torch.Tensor):
        super().__init__()
        self.op_of = {name: op for op in ops for name in _OPS[op]}  # torch function name -> masked op
        self.mask = mask  # [E] (every row) or [G, E] (row block g of G equal blocks): 0 kept, -inf removed
        self.hits = dict.fromkeys(ops, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = self.op_of.get(getattr(func, "__name__", ""))
        if op is not None and isinstance(out, torch.Tensor):
            E = self.mask.shape[-1]
            if out.shape[-1] == E and self.mask.dim() == 1:
                self.hits[op] += 1
                return out + self.mask.to(device=out.device, dtype=out.dtype)
            if out.shape[-1] == E and out.numel() % (self.mask.numel()) == 0:  # [N, E], N = G·c rows
                self.hits[op] += 1
                mask = self.mask.to(device=out.device, dtype=out.dtype)
                return (out.reshape(self.mask.shape[0], -1, E) + mask[:, None, :]).view(out.shape)
        return out


def _mask(adapter: MoEAdapter, drop) -> torch.Tensor:
    """[E + Z]: -inf on the experts in `drop` (all < E), 0 elsewhere (the Z extra router classes included)."""
    if any(not 0 <= int(j) < adapter.num_experts for j in drop):
        raise MoePruneError(f"cannot mask {sorted(drop)}: experts are 0..{adapter.num_experts - 1}.")
    mask = torch.zeros(adapter.num_experts + getattr(adapter, "extra_classes", 0))  # duck-typed adapters: Z = 0
    mask[list(drop)] = float("-inf")
    return mask


def _wrap(router: nn.Module, ops: tuple[str, ...], mask: torch.Tensor):
    """Patch `router.forward`; the counter holds its calls, the calls in which every op was masked ("hits"), and
    each op's masked outputs ("ops")."""
    original = router.forward
    counter = {"calls": 0, "hits": 0, "ops": dict.fromkeys(ops, 0)}

    def forward(*args, **kwargs):
        mode = _MaskColumns(ops, mask)
        with mode:
            out = original(*args, **kwargs)
        counter["calls"] += 1
        counter["hits"] += all(mode.hits.values())
        for op, n in mode.hits.items():
            counter["ops"][op] += n
        return out

    router.forward = forward
    return counter


@contextmanager
def masked_experts(model: nn.Module, adapter: MoEAdapter, dropped: dict[int, list[int]]) -> Iterator[dict]:
    """Inside the context, experts `dropped[layer]` can never be routed to. Yields per-layer hit counters.

    Raises MoePruneError on exit if a router ran but one of the masked ops was not seen in one of its calls (the
    family's routing kind would then be wrong and the reference meaningless).
    """
    ops = adapter.routing().masked_ops
    patched: list[nn.Module] = []
    counters: dict[int, dict] = {}
    try:
        for layer, drop in dropped.items():
            if not drop:
                continue
            router = adapter.router(adapter.block(model, layer))
            counters[layer] = _wrap(router, ops, _mask(adapter, drop))
            patched.append(router)
        yield counters
    finally:
        for router in patched:
            del router.forward  # drop the instance attribute, back to the class's forward
    _check_hits(counters, ops)


@contextmanager
def masked_rows(model: nn.Module, adapter: MoEAdapter, layer: int, drops: list[tuple[int, ...]]) -> Iterator[dict]:
    """Inside the context, a router call of `layer` on N rows masks `drops[g]` on rows g·c..(g+1)·c, c = N / G
    (G = len(drops); N must be a multiple of G). Yields the layer's hit counter; raises as `masked_experts`."""
    ops = adapter.routing().masked_ops
    router = adapter.router(adapter.block(model, layer))
    mask = torch.stack([_mask(adapter, drop) for drop in drops])  # [G, E]
    counter = _wrap(router, ops, mask)
    try:
        yield counter
    finally:
        del router.forward
    _check_hits({layer: counter}, ops)


def _check_hits(counters: dict[int, dict], ops: tuple[str, ...]) -> None:
    silent = {layer: [op for op, n in c["ops"].items() if n < c["calls"]]
              for layer, c in counters.items() if c["calls"] and c["hits"] < c["calls"]}
    if silent:
        missed = sorted({op for names in silent.values() for op in names})
        raise MoePruneError(f"expert mask found no {' / '.join(repr(op) for op in missed)} output of width E in "
                            f"some calls of the routers of layers {sorted(silent)} (masked ops {ops})")

"""Repair layer by layer, sequentially: each layer is repaired on the student's own stream (earlier layers repaired).

    for decoder layer i (MoE layers):
        O_T = teacher_i(X), err₀ = Σ‖O_T − student_i(X)‖²                      (`capture.block_error`)
        for each fix f (obs, compensate, router — as asked and as the cut allows):
            stats over the records → proposal P_f (`fixes.py`)
            for α in STEPS: W_α = W + α (P_f − W); err(α) measured on the same calibration tokens
            keep argmin over α ∈ {0} ∪ STEPS (α = 0: the fix did not help this layer and is dropped)
        X ← student_i(X) with the kept values
So no repair increases the calibration block error it minimises: err_after ≤ err₀ by construction, per layer.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import moeprune.repair.router  # noqa: F401  (registers the router fix)
from moeprune.calibration.data import CalibSet
from moeprune.calibration.session import make_batches
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.repair.capture import block_error, layer_output, records
from moeprune.repair.fixes import FIXES, LayerCtx, Proposal

STEPS = (1.0, 0.5, 0.25)
KINDS = ("obs", "compensate", "router", "all")


def fixes_for(kind: str, previous_kind: str) -> list[str]:
    """The fixes a kind runs after a stage of `previous_kind`: `all` = obs (after neuron removal), compensate, and
    router (after expert removal or merging)."""
    if kind != "all":
        return [kind]
    return (["obs"] if previous_kind == "neurons" else []) + ["compensate"] + \
        (["router"] if previous_kind in ("experts", "merge") and "router" in FIXES else [])


@dataclass
class RepairResult:
    experts: MutableMapping  # layer -> expert -> role -> value (a dict, or a store on disk: stages/weights_store.py)
    router: dict[int, dict[str, torch.Tensor]]  # layer -> name -> value
    summary: dict


def _write(adapter: MoEAdapter, block: nn.Module, values: Proposal) -> None:
    for i, roles in values.experts.items():
        views = adapter.expert_views(block, i)
        for role, v in roles.items():
            views[role].copy_(v.to(views[role].dtype))
    router = adapter.router_tensors(block)
    for name, v in values.router.items():
        router[name].copy_(v.to(router[name].dtype))


def _snapshot(adapter: MoEAdapter, block: nn.Module, prop: Proposal) -> Proposal:
    views = {i: adapter.expert_views(block, i) for i in prop.experts}
    router = adapter.router_tensors(block)
    return Proposal({i: {r: views[i][r].detach().clone() for r in roles} for i, roles in prop.experts.items()},
                    {n: router[n].detach().clone() for n in prop.router})


def _blend(old: Proposal, new: Proposal, alpha: float) -> Proposal:
    def mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.double() + alpha * (b.double() - a.double())

    return Proposal({i: {r: mix(old.experts[i][r], v) for r, v in roles.items()} for i, roles in new.experts.items()},
                    {n: mix(old.router[n], v) for n, v in new.router.items()})


@torch.no_grad()
def repair_model(teacher: nn.Module, student: nn.Module, t_adapter: MoEAdapter, s_adapter: MoEAdapter,
                 sets: list[CalibSet], kinds: list[str], *, slots: dict[int, list[int]],
                 positions: dict[int, dict[int, list[int]]], previous_kind: str, damp: float = 0.01,
                 batch_size: int = 8, device: str = "cpu",
                 student_context: Callable[[int], AbstractContextManager] | None = None,
                 teacher_context: Callable[[int], AbstractContextManager] | None = None,
                 experts_out: MutableMapping | None = None) -> RepairResult:
    """Repair `student` in place toward `teacher` on `sets` (module docstring); the new values and a summary.
    `experts_out`: where each layer's new expert values go as the layer finishes (default a dict; a lazy run passes a
    `SpilledLayers`, so they wait on disk).

    `student_context(i)` / `teacher_context(i)`: entered around everything layer i does, for models loaded lazily
    (`StageContext.lazy_model`: decoder layer i is materialised there, with the earlier plans applied)."""
    batches = make_batches(student, s_adapter, sets, batch_size, device)
    moe = set(s_adapter.moe_layers())
    n = len(s_adapter.decoder_layers(student))
    result = RepairResult({} if experts_out is None else experts_out, {},
                          {"layers": {}, "kinds": kinds, "damp": damp, "steps": list(STEPS),
                           "tokens": int(sum(int(b.attention_mask.sum()) for b in batches))})
    for i in (bar := tqdm(range(n), leave=False)):
        bar.set_description(f"repair ({', '.join(kinds)}) layer {i + 1}/{n}")
        with (student_context or _nothing)(i), (teacher_context or _nothing)(i) if i in moe else nullcontext():
            s_layer = s_adapter.decoder_layers(student)[i]
            home = next(s_layer.parameters()).device
            s_layer.to(device)
            if i in moe:
                t_layer = t_adapter.decoder_layers(teacher)[i]
                t_home = next(t_layer.parameters()).device
                _repair_layer(i, t_layer.to(device), s_layer, teacher, student, t_adapter, s_adapter, batches,
                              kinds, slots, positions, previous_kind, damp, device, result)
                t_layer.to(t_home)
            outs = [layer_output(s_layer, b, i, device, carry=True) for b in batches]  # as repaired
            s_layer.to(home)
        for b, out in zip(batches, outs, strict=True):
            b.hidden = out
    return result


def _nothing(i: int) -> AbstractContextManager:
    return nullcontext()


def _repair_layer(i, t_layer, s_layer, teacher, student, t_adapter, s_adapter, batches, kinds, slots, positions,
                  previous_kind, damp, device, result: RepairResult) -> None:
    t_block, s_block = t_adapter.block(teacher, i), s_adapter.block(student, i)
    t_experts, s_experts = t_adapter.experts(t_block), s_adapter.experts(s_block)
    targets = [layer_output(t_layer, b, i, device) for b in batches]
    err0 = block_error(s_layer, targets, batches, i, device)
    ctx = LayerCtx(i, t_block, s_block, t_adapter, s_adapter, slots[i], positions.get(i, {}), damp, previous_kind)
    err, first, steps = err0, None, {}
    for name in kinds:
        fix = FIXES.get(name)(ctx)
        s_router = s_adapter.router(s_block) if fix.needs_router_input else None
        for rec in records(t_layer, s_layer, t_experts, s_experts, batches, i, device, s_router):
            fix.accumulate(rec)
        prop = fix.propose()
        old = _snapshot(s_adapter, s_block, prop)
        first = old if first is None else _merge(first, old)
        best = (err, 0.0)
        for alpha in STEPS:
            _write(s_adapter, s_block, _blend(old, prop, alpha))
            e = block_error(s_layer, targets, batches, i, device)
            if e < best[0]:
                best = (e, alpha)
        _write(s_adapter, s_block, _blend(old, prop, best[1]))
        err = best[0]
        steps[name] = {"alpha": best[1], "error": best[0]}
        logger.debug("repair layer %d %s: α=%.2f error %.4g", i, name, best[1], best[0])
    changed = _snapshot(s_adapter, s_block, first) if first is not None else Proposal()
    kept = Proposal({j: {r: v for r, v in roles.items() if not torch.equal(v, first.experts[j][r])}
                     for j, roles in changed.experts.items()},
                    {n: v for n, v in changed.router.items() if not torch.equal(v, first.router[n])})
    kept.experts = {j: roles for j, roles in kept.experts.items() if roles}
    if kept.experts:
        result.experts[i] = kept.experts
    if kept.router:
        result.router[i] = kept.router
    result.summary["layers"][str(i)] = {"error_before": err0, "error_after": err,
                                        "ratio": err / err0 if err0 > 0 else 1.0, "fixes": steps}


def _merge(a: Proposal, b: Proposal) -> Proposal:
    """The earliest snapshot of every tensor in a or b (a's value wins: it was taken first)."""
    experts = {i: dict(roles) for i, roles in b.experts.items()}
    for i, roles in a.experts.items():
        experts.setdefault(i, {}).update(roles)
    return Proposal(experts, {**b.router, **a.router})

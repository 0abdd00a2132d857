"""One decoder layer of the teacher (the model before the cut) and of the student (after it) on the same input.

For every batch b at the input X_b of decoder layer i (the student's own stream: earlier layers already repaired):

    O_T = teacher_layer_i(X_b),  O_S = student_layer_i(X_b)                         [B, S, H]
    the student's experts call:  x [T, H], top-k indices idx [T, k], weights w [T, k], output U_S [T, H]
    the teacher's experts call:  idx_T, w_T [T, k], output U_T [T, H]
Attention and everything outside the experts are the same in both, so O_T − O_S comes from the experts alone, and

    block error  err = Σ_{real t} ‖O_T(t) − O_S(t)‖²     (what every repair must not increase; `run.py` measures it)
Rows are restricted to real tokens (attention mask), T = real tokens of the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moeprune.calibration.engine import LayerInputs, call_layer, to_device


@dataclass
class Record:
    """One batch of one layer (real tokens only)."""

    x: torch.Tensor  # [T, H] the student experts' input
    idx: torch.Tensor  # [T, k] the student's top-k experts
    w: torch.Tensor  # [T, k] their weights
    u_student: torch.Tensor  # [T, H] the student experts' output
    u_teacher: torch.Tensor  # [T, H] the teacher experts' output
    idx_teacher: torch.Tensor  # [T, k]
    w_teacher: torch.Tensor  # [T, k]
    router_in: torch.Tensor | None = None  # [T, H_r] the student router's input (None: the router was not seen)


@contextmanager
def router_input(router: nn.Module | None) -> Iterator[dict]:
    """Inside: `seen["x"]` holds the last router call's input [T, H_r]."""
    seen: dict = {}
    if router is None:
        yield seen
        return

    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        seen["x"] = x.detach().reshape(-1, x.shape[-1])

    handle = router.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def experts_calls(experts: nn.Module) -> Iterator[dict]:
    """Inside: `seen` holds the last call's (hidden [T, H], idx [T, k], weights [T, k], output [T, H])."""
    seen: dict = {}

    def hook(module, args, kwargs, output):
        named = [*args, *kwargs.values()]
        hidden, idx, w = named[0], named[1], named[2]
        seen["x"] = hidden.detach().reshape(-1, hidden.shape[-1])
        seen["idx"], seen["w"] = idx.detach(), w.detach()
        seen["out"] = (output[0] if isinstance(output, tuple) else output).detach().reshape(-1, hidden.shape[-1])

    handle = experts.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def layer_output(layer: nn.Module, batch: LayerInputs, i: int, device: str, carry: bool = False) -> torch.Tensor:
    """Decoder layer i on the batch's current hidden states (its recorded kwargs) -> [B, S, H] on the CPU.
    `carry`: write the layer's extra outputs into layer i+1's kwargs (DSA top-k indices, `engine` docstring)."""
    out = call_layer(layer, batch.hidden.to(device), batch.kwargs[i], device)
    if isinstance(out, tuple):
        if carry:
            for name, j in batch.carries.get(i + 1, {}).items():
                batch.kwargs[i + 1][name] = to_device(out[j], "cpu")
        out = out[0]
    return out.detach().cpu()


@torch.no_grad()
def records(teacher_layer: nn.Module, student_layer: nn.Module, teacher_experts: nn.Module,
            student_experts: nn.Module, batches: list[LayerInputs], i: int, device: str,
            student_router: nn.Module | None = None) -> Iterator[Record]:
    """One `Record` per batch (see module docstring); `student_router`: also record its input."""
    for b in batches:
        valid = b.attention_mask.reshape(-1).bool()  # [T_all]
        with experts_calls(teacher_experts) as t:
            call_layer(teacher_layer, b.hidden.to(device), b.kwargs[i], device)
        with experts_calls(student_experts) as s, router_input(student_router) as r:
            call_layer(student_layer, b.hidden.to(device), b.kwargs[i], device)
        v = valid.to(s["x"].device)
        rin = r["x"][v.to(r["x"].device)] if "x" in r and r["x"].shape[0] == v.shape[0] else None
        yield Record(s["x"][v], s["idx"][v], s["w"][v], s["out"][v], t["out"][v.to(t["out"].device)],
                     t["idx"][v.to(t["idx"].device)], t["w"][v.to(t["w"].device)], rin)


@torch.no_grad()
def block_error(student_layer: nn.Module, targets: list[torch.Tensor], batches: list[LayerInputs], i: int,
                device: str) -> float:
    """Σ_real ‖O_T − O_S‖² with the student layer as it is now (`targets` = O_T per batch)."""
    err = 0.0
    for b, target in zip(batches, targets, strict=True):
        out = layer_output(student_layer, b, i, device)
        err += float(((out - target).double()[b.attention_mask.bool()] ** 2).sum())
    return err

"""Per-slot expert outputs from transformers' grouped_mm experts kernel, without the one-slot-per-row detour.

The collector needs f_j(t), expert j's output before the gate multiply, for every routed (token, slot) pair and
the probe pairs. Calling the experts module with one slot per row does that for any experts code, but with
transformers' `grouped_mm` implementation (`integrations/moe.py: grouped_mm_experts_forward`) it costs three extra
passes over the [M, H] rows (M = T·k + P·E): the caller's copy of the rows, the kernel's multiply by the all-ones
weights, and its sum over a slot axis of size 1 (a zero fill and a copy). `slot_outputs` runs the same kernel
steps on the pairs directly:

    ids, perm = sort(expert)                          group the M pairs by expert
    x = hidden[token[perm]]                           [M, H]   one gather (the kernel's own)
    offs = cumsum(histc(ids, E))                      group boundaries (on the CPU in bf16 each group is rounded
                                                      up to 32 rows with zero rows: `io/kernel_cache.pad_rows`)
    u = gate(grouped_linear(x, W_gate_up, offs, b))   [M, I]   the module's own `_apply_gate` (or `act_fn`)
    y = grouped_linear(u, W_down, offs, b)            [M, H]   (then `post_expert_norm` where the class has one)
    f = y[perm⁻¹]                                     [M, H]   back in pair order

with transformers' own `_grouped_linear` and the module's gate, activation, biases and layout flags, so f is the
kernel's output for each pair before `weighted_out = f · w` (the brute-force tests compare both ways).
It applies only where the module dispatches to that very kernel (`uses_grouped_mm`); every other experts code
(eager loops, remote code, batched_mm, expert parallelism, zero-expert router classes) keeps the one-slot-per-row
call.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from moeprune import compat
from moeprune.errors import MoePruneError
from moeprune.io.kernel_cache import onednn_serves, rounded_rows


def uses_grouped_mm(experts: nn.Module) -> bool:
    """True when `experts.forward` runs transformers' `grouped_mm_experts_forward` (the class's own forward is the
    dispatch `use_experts_implementation` installs, its config asks for `grouped_mm`, and expert parallelism is
    off). A subclass that overrides the decorated forward (transformers 5.25's Ergo adds a per-expert norm around
    its parent's dispatch) is not the kernel. A transformers without the kernel's pieces (`moeprune.compat`) gives
    False: the collector's one-slot-per-row call."""
    if not hasattr(experts, "has_gate") or getattr(experts, "_is_expert_parallel", True):
        return False
    if getattr(type(experts).forward, "__code__", None) is not _dispatch_code():
        return False
    config = getattr(experts, "config", None)
    if getattr(config, "_experts_implementation", None) != "grouped_mm":
        return False
    try:
        kernel, registry, _ = compat.grouped_mm_experts_forward, compat.ALL_EXPERTS_FUNCTIONS, compat.grouped_linear
    except MoePruneError:  # a transformers without the kernel's pieces
        return False
    return registry.get("grouped_mm") is kernel


@cache
def _dispatch_code():
    """The code object of the forward `use_experts_implementation` puts on a class (one per transformers install:
    every decorated class's forward is a closure over it); None without the decorator."""
    try:
        decorate = compat.use_experts_implementation
    except MoePruneError:
        return None

    class Probe(nn.Module):
        def forward(self, *args):
            return args

    return decorate(Probe).forward.__code__


def slot_outputs(experts: nn.Module, hidden: torch.Tensor, token: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """hidden: [N, H] token states; token, expert: [M] long, pair m = (token[m], expert[m]) with expert < E.
    Returns [M, H]: expert[m]'s output on hidden[token[m]] (before any routing weight), in hidden's dtype."""
    ids, perm = torch.sort(expert)  # [M] each
    x = hidden[token[perm]]  # [M, H]
    E = experts.num_experts
    counts = torch.histc(ids.float() if ids.device.type in ("cpu", "mps") else ids.int(), bins=E, min=0, max=E - 1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)  # [M] (a gather is faster than y's scatter)
    padded = _padded_groups(ids, counts, x)
    if padded is not None:  # oneDNN on the CPU: groups rounded up to ROW_BUCKET rows (`io/kernel_cache.pad_rows`)
        rows, counts = padded  # [M] each sorted pair's row among the M' = Σ counts, [E] the rounded group sizes
        x = x.new_zeros(int(counts.sum()), x.shape[1]).index_copy_(0, rows, x)  # [M', H]
        if experts.has_bias:  # each padded row's expert, for the bias rows
            ids = torch.repeat_interleave(torch.arange(E, device=ids.device), counts.long())  # [M']
        inverse = rows[inverse]  # [M]: pair -> its row among the M'
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E]
    first = experts.gate_up_proj if experts.has_gate else experts.up_proj
    first_bias = None
    if experts.has_bias:
        first_bias = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[ids]
    u = compat.grouped_linear(x, first, offs, bias=first_bias, is_transposed=experts.is_transposed)  # [M, 2I] or [M, I]
    u = experts._apply_gate(u) if experts.has_gate else experts.act_fn(u)  # [M, I]
    down_bias = experts.down_proj_bias[ids] if experts.has_bias else None
    y = compat.grouped_linear(u, experts.down_proj, offs, bias=down_bias, is_transposed=experts.is_transposed)  # [M, H]
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)
    return y[inverse].to(hidden.dtype)  # [M, H] pair order


def _padded_groups(ids: torch.Tensor, counts: torch.Tensor, x: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where oneDNN serves the grouped matmuls (CPU, bf16 / fp16; `io/kernel_cache.pad_rows` says why): every
    group rounded up to a multiple of ROW_BUCKET rows (zero rows after each group's own) as ([M] the row of each
    sorted pair, [E] the rounded group sizes); else None. Each group's size is a matmul shape of its own, and ~130
    sizes per projection and layer turn the bounded kernel cache over on every call."""
    if not onednn_serves(x):
        return None
    c = counts.long()  # [E]
    padded = rounded_rows(c)  # [E]
    start, first = torch.cumsum(padded, 0) - padded, torch.cumsum(c, 0) - c  # [E] each
    return start[ids] + torch.arange(ids.shape[0], device=ids.device) - first[ids], padded  # [M], [E]

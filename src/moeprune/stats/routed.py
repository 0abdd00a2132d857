"""Routed-expert statistics from the routing the model actually applies.

The collector wraps a MoE block's experts module. The block calls it with the real routing — indices and
weights after softmax/sigmoid, correction bias, groups, renormalisation and scaling — so nothing is recomputed.
For the T·k (token, slot) pairs it calls the model's own experts code once with one-hot routing (weight 1), which
returns f_j(t), expert j's output before the gate multiply, for every pair; the block output is then rebuilt as
Σ_slots g·f (same experts work as the normal forward, summed in another order).

Per expert j, over routed non-padding tokens t ∈ A_j (float64 sums):
    count = |A_j|,  gate_sum = Σ g_j(t),  norm_sum = Σ ‖f_j(t)‖,  sq_norm_sum = Σ ‖f_j(t)‖²,
    gate_norm_sum = Σ g_j(t)·‖f_j(t)‖,  max_abs = max |f_j(t)| over entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

FIELDS = ("count", "gate_sum", "norm_sum", "sq_norm_sum", "gate_norm_sum", "max_abs")


@dataclass
class RoutedStats:
    """Sums for one MoE layer, [E] float64 each."""

    num_experts: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in FIELDS:
            self.sums.setdefault(name, torch.zeros(self.num_experts, dtype=torch.float64))

    def update(self, idx: torch.Tensor, gate: torch.Tensor, f: torch.Tensor, valid: torch.Tensor) -> None:
        """idx, gate: [T, k]; f: [T, k, H] expert outputs; valid: [T] bool (False on padding)."""
        E = self.num_experts
        keep = valid[:, None].expand_as(idx)  # [T, k]
        j = idx[keep]  # [M]
        g = gate[keep].double()  # [M]
        fk = f[keep].double()  # [M, H]
        norm = fk.norm(dim=-1)  # [M]
        s = self.sums
        s["count"] += torch.bincount(j, minlength=E).double()
        s["gate_sum"].index_add_(0, j, g)
        s["norm_sum"].index_add_(0, j, norm)
        s["sq_norm_sum"].index_add_(0, j, norm.square())
        s["gate_norm_sum"].index_add_(0, j, g * norm)
        if j.numel():
            peak = fk.abs().amax(dim=-1)  # [M]
            s["max_abs"] = s["max_abs"].scatter_reduce(0, j, peak, reduce="amax")

    def merge(self, other: RoutedStats) -> RoutedStats:
        """Statistics of the union of both data sets (sums add, maxima take the max)."""
        out = RoutedStats(self.num_experts)
        for name in FIELDS:
            op = torch.maximum if name == "max_abs" else torch.add
            out.sums[name] = op(self.sums[name], other.sums[name])
        return out


class RoutedCollector:
    """Context manager: while active, the experts module's forward also feeds `stats`.

    `valid` must be set to the current batch's flattened non-padding mask [T] before each forward.
    """

    def __init__(self, experts: nn.Module, stats: RoutedStats):
        self.experts, self.stats = experts, stats
        self.valid: torch.Tensor | None = None

    def __enter__(self) -> RoutedCollector:
        original = self.experts.forward

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            T, k = top_k_index.shape
            rows = hidden_states.repeat_interleave(k, dim=0)  # [T*k, H]
            one = torch.ones(T * k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
            f = original(rows, top_k_index.reshape(-1, 1), one, *args, **kwargs).view(T, k, -1)  # [T, k, H]
            valid = self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool)
            self.stats.update(top_k_index.cpu(), top_k_weights.detach().cpu(), f.detach().cpu(), valid.cpu())
            return (f * top_k_weights[..., None].to(f.dtype)).sum(dim=1)  # [T, H]

        self.experts.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        del self.experts.forward

"""Routed-expert statistics from the routing the model actually applies.

The collector wraps a MoE block's experts module. The block calls it with the real routing — indices and
weights after softmax/sigmoid, correction bias, groups, renormalisation and scaling — so nothing is recomputed.
For the T·k (token, slot) pairs it calls the model's own experts code once with one-hot routing (weight 1), which
returns f_j(t), expert j's output before the gate multiply, for every pair; the block output is then rebuilt as
r_t = Σ_slots g·f (same experts work as the normal forward, summed in another order). A forward hook on the
router keeps its logits for the router-probability statistics.

Per expert j, over non-padding tokens t (A_j = tokens routed to j; h_t = the MoE block input; float64 sums):
    count = |A_j|,  gate_sum = Σ_{A_j} g_j(t),  norm_sum = Σ_{A_j} ‖f_j(t)‖,  sq_norm_sum = Σ_{A_j} ‖f_j(t)‖²,
    gate_norm_sum = Σ_{A_j} g_j(t)·‖f_j(t)‖,  max_abs = max_{A_j} max |f_j(t)|,
    easy_ep_sum = Σ_{A_j} g_j(t)·‖f_j(t)‖·max(0, 1 − cos(h_t, h_t + r_t))                       (EASY-EP)
    prob_sum = Σ_t p_j(t),  prob_topk_sum = Σ_{A_j} p_j(t),  prob_top1_sum = Σ_t p_j(t)·1[j = argmax p(t)]
    coact[i, j] = #{t : i ∈ TopK(t) and j ∈ TopK(t)}  (diagonal = count),  tokens = #{t}
p(t) is the router's distribution over all E experts: softmax(logits) for softmax routers, σ(logits)/Σσ(logits)
for sigmoid routers (TCESS, PreMoe).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_FIELDS = ("count", "gate_sum", "norm_sum", "sq_norm_sum", "gate_norm_sum", "max_abs", "easy_ep_sum",
                 "prob_sum", "prob_topk_sum", "prob_top1_sum")
FIELDS = (*EXPERT_FIELDS, "coact", "tokens")
MAX_FIELDS = frozenset({"max_abs"})  # merged by max; every other field by addition


def field_shape(name: str, num_experts: int) -> tuple[int, ...]:
    return {"coact": (num_experts, num_experts), "tokens": (1,)}.get(name, (num_experts,))


@dataclass
class RoutedStats:
    """Sums for one MoE layer: [E] float64 per expert field, coact [E, E], tokens [1]."""

    num_experts: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in FIELDS:
            self.sums.setdefault(name, torch.zeros(field_shape(name, self.num_experts), dtype=torch.float64))

    def to(self, device: torch.device | str) -> RoutedStats:
        self.sums = {k: v.to(device) for k, v in self.sums.items()}
        return self

    def update(self, idx: torch.Tensor, gate: torch.Tensor, f: torch.Tensor, valid: torch.Tensor,
               h: torch.Tensor, probs: torch.Tensor | None, r: torch.Tensor | None = None) -> None:
        """idx, gate: [T, k]; f: [T, k, H] expert outputs; valid: [T] bool (False on padding);
        h: [T, H] MoE block input; probs: [T, E] router distribution (None: router stats not collected);
        r: [T, H] routed output Σ_k g·f when the caller has it already.

        Per-element work on [T, k, H] stays in float32 (norms, maxima); the EASY-EP cosine is float64 on [T, H];
        per-token results are summed in float64. Padding rows get weight 0 (no copies)."""
        E, s = self.num_experts, self.sums
        w = valid.to(idx.device, torch.float64)  # [T] 1 = real token
        if r is None:
            r = (f * gate[..., None].to(f.dtype)).sum(dim=1)  # [T, H]
        ff = f.float()
        norm = torch.linalg.vector_norm(ff, dim=-1).double()  # [T, k]
        peak = torch.maximum(ff.amax(dim=-1), -ff.amin(dim=-1)).double() * w[:, None]  # [T, k] max |f|; 0 neutral
        hd = h.double()  # 1 − cos is a small difference of numbers near 1: float64 on [T, H]
        novelty = (1 - F.cosine_similarity(hd, hd + r.double(), dim=-1)).clamp_min(0) * w  # [T]
        g = gate.double() * w[:, None]  # [T, k] gate, 0 on padding
        j = idx.reshape(-1)  # [M = T·k]
        n = norm.reshape(-1)  # [M]
        wk = w[:, None].expand_as(norm).reshape(-1)  # [M]
        s["count"] += torch.bincount(j, weights=wk, minlength=E)
        s["gate_sum"].index_add_(0, j, g.reshape(-1))
        s["norm_sum"].index_add_(0, j, n * wk)
        s["sq_norm_sum"].index_add_(0, j, n.square() * wk)
        s["gate_norm_sum"].index_add_(0, j, (g * norm).reshape(-1))
        s["easy_ep_sum"].index_add_(0, j, (g * norm * novelty[:, None]).reshape(-1))
        if j.numel():
            s["max_abs"] = s["max_abs"].scatter_reduce(0, j, peak.reshape(-1), reduce="amax")
        onehot = torch.zeros(idx.shape[0], E, dtype=torch.float64, device=idx.device)  # [T, E]
        onehot.scatter_(1, idx, 1.0)
        s["coact"] += (onehot * w[:, None]).T @ onehot  # [E, E]
        s["tokens"] += w.sum()
        if probs is not None:
            p = probs.double() * w[:, None]  # [T, E]
            s["prob_sum"] += p.sum(dim=0)
            s["prob_topk_sum"] += (p * onehot).sum(dim=0)
            top1 = torch.zeros_like(p).scatter_(1, p.argmax(dim=-1, keepdim=True), 1.0)  # [T, E]
            s["prob_top1_sum"] += (p * top1).sum(dim=0)

    def merge(self, other: RoutedStats) -> RoutedStats:
        """Statistics of the union of both data sets (sums add, maxima take the max)."""
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge stats of {self.num_experts} and {other.num_experts} experts")
        out = RoutedStats(self.num_experts)
        for name in FIELDS:
            op = torch.maximum if name in MAX_FIELDS else torch.add
            out.sums[name] = op(self.sums[name], other.sums[name].to(self.sums[name].device))
        return out


def router_probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """[T, E] logits -> [T, E] distribution over experts (see module docstring)."""
    if kind == "sigmoid_grouped":
        scores = torch.sigmoid(logits.double())
        return scores / scores.sum(dim=-1, keepdim=True)
    return torch.softmax(logits.double(), dim=-1)


class RoutedCollector:
    """Context manager: while active, the experts module's forward (and the router's logits) feed `stats`.

    `valid` must be set to the current batch's flattened non-padding mask [T] before each forward. With
    `router=None` the router-probability fields stay zero.
    """

    def __init__(self, experts: nn.Module, stats: RoutedStats, router: nn.Module | None = None,
                 routing_kind: str = "softmax_topk"):
        self.experts, self.stats, self.router, self.kind = experts, stats, router, routing_kind
        self.valid: torch.Tensor | None = None
        self.layer = -1  # decoder-layer index, for callers that switch `stats` per batch
        self._logits: torch.Tensor | None = None
        self._hook = None

    def _keep_logits(self, module, args, output) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        E = self.stats.num_experts
        if not isinstance(logits, torch.Tensor) or logits.shape[-1] != E:
            raise RuntimeError(f"router {type(module).__name__} did not return [T, {E}] logits first")
        self._logits = logits.detach().reshape(-1, E)

    def __enter__(self) -> RoutedCollector:
        original = self.experts.forward
        if self.router is not None:
            self._hook = self.router.register_forward_hook(self._keep_logits)

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            T, k = top_k_index.shape
            rows = hidden_states.repeat_interleave(k, dim=0)  # [T*k, H]
            one = torch.ones(T * k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
            f = original(rows, top_k_index.reshape(-1, 1), one, *args, **kwargs).view(T, k, -1)  # [T, k, H]
            valid = self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool)
            probs = router_probs(self._logits, self.kind) if self._logits is not None else None
            self._logits = None
            out = (f * top_k_weights[..., None].to(f.dtype)).sum(dim=1)  # [T, H]
            self.stats.to(f.device).update(top_k_index, top_k_weights.detach(), f.detach(), valid,
                                           hidden_states.detach(), probs, out.detach())
            return out

        self.experts.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        del self.experts.forward
        if self._hook is not None:
            self._hook.remove()
        self.stats.to("cpu")

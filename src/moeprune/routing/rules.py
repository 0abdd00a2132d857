"""The per-token rules of the routing policies, as pure functions of one router call's outputs.

Inputs: w [N, k] the gate weights the family's router hands its experts (for its own top-k T_t), σ [N, k] the
selection scores it ranked them by (`models/dynamic.selection_scores`). Output: keep [N, k] bool, at least one
True per row (the expert of largest weight is always kept). With w_(1) ≥ w_(2) ≥ … the weights sorted per token:

- ``topk`` (k'):  keep the k' experts of largest σ — the experts a stock router with top-k' selects (group
  limits do not depend on k, so these are the first k' of T_t by σ).
- ``top_p`` (p, k_min, k_max):  w̃ = w / Σ w (the mass *within the model's top-k*: experts outside it are never
  routed; for softmax routers this is the paper's probability mass restricted to T_t); keep the smallest prefix
  of the w̃-sorted experts whose mass is ≥ p, i.e. n = #{i : Σ_{j<i} w̃_(j) < p}, clamped to [k_min, k_max].
- ``naee_skip`` (β):  keep w_(1) and every w_(i) ≥ β·w_(1); skip the i-th expert when w_(i) < β·w_(1) (NAEE's
  dynamic skipping, generalised from top-2 to top-k).
Ties are broken by slot order (stable sort).
"""

from __future__ import annotations

import torch


def _keep_first(order: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """keep [N, k]: True on the slots whose rank in `order` [N, k] (slot indices, best first) is < n [N]."""
    N, k = order.shape
    rank_keep = torch.arange(k, device=order.device)[None, :] < n[:, None]  # [N, k] by rank
    keep = torch.zeros(N, k, dtype=torch.bool, device=order.device)
    return keep.scatter_(1, order, rank_keep)


def _by_weight(w: torch.Tensor) -> torch.Tensor:
    return torch.sort(w.double(), dim=-1, descending=True, stable=True)[1]  # [N, k]


def keep_topk(sel: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(sel.double(), dim=-1, descending=True, stable=True)[1]  # [N, k]
    return _keep_first(order, torch.full((sel.shape[0],), k, device=sel.device))


def top_p_counts(w: torch.Tensor, p: float | torch.Tensor, k_min: int = 1, k_max: int | None = None) -> torch.Tensor:
    """n [N]: experts top-p keeps per token (`p` a float, or [N] per token)."""
    k = w.shape[-1]
    ws = torch.sort(w.double(), dim=-1, descending=True, stable=True)[0]  # [N, k]
    mass = ws / ws.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    before = torch.cumsum(mass, dim=-1) - mass  # [N, k]: Σ_{j<i} w̃_(j)
    p = torch.as_tensor(p, dtype=torch.float64, device=w.device)
    n = (before < (p[:, None] if p.dim() else p)).sum(dim=-1)  # [N]
    return n.clamp(min=max(k_min, 1), max=k if k_max is None else k_max)


def keep_top_p(w: torch.Tensor, p: float, k_min: int = 1, k_max: int | None = None) -> torch.Tensor:
    return _keep_first(_by_weight(w), top_p_counts(w, p, k_min, k_max))


def naee_counts(w: torch.Tensor, beta: float) -> torch.Tensor:
    """n [N]: experts kept by NAEE skipping: 1 + #{i ≥ 2 : w_(i) ≥ β·w_(1)}."""
    ws = torch.sort(w.double(), dim=-1, descending=True, stable=True)[0]  # [N, k]
    return 1 + (ws[:, 1:] >= beta * ws[:, :1]).sum(dim=-1)


def keep_naee(w: torch.Tensor, beta: float) -> torch.Tensor:
    return _keep_first(_by_weight(w), naee_counts(w, beta))


def naee_beta(w: torch.Tensor) -> float:
    """β = median over tokens of w_(2) / w_(1) (NAEE's per-layer threshold, from calibration; for an even count
    the lower of the two middle values, as torch.median)."""
    ws = torch.sort(w.double(), dim=-1, descending=True)[0]  # [N, k]
    if ws.shape[-1] < 2:
        return 0.0
    return float((ws[:, 1] / ws[:, 0].clamp_min(torch.finfo(torch.float64).tiny)).median())

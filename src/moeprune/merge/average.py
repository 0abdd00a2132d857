"""Frequency-weighted expert averaging (M-SMoE / HC-SMoE style merge of one group into one expert).

For a group of n experts with usage weights w_i >= 0 (Σ w_i > 0), after aligning every member's neurons to the
anchor (`align.align_group`, weight matching), each role is averaged element-wise:

    W_merged = Σ_i w_i · W_i / Σ_i w_i          for W ∈ {gate [I, H], up [I, H], down [H, I], biases}

computed in float64 and returned in the inputs' dtype (on the anchor's device). The anchor defaults to the member
with the largest weight (the first one on ties). A group of one returns that expert; a group of identical experts
(or of one expert under different neuron permutations, when align=True) returns that expert's function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moeprune.errors import MoePruneError
from moeprune.merge.align import align_group, check_group


def check_weights(weights: Sequence[float] | torch.Tensor, n: int) -> torch.Tensor:
    """Merge weights as a float64 CPU tensor [n]; finite, >= 0, positive sum, one per member."""
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)  # [n]
    except (TypeError, ValueError, RuntimeError) as e:
        raise MoePruneError(f"merge weights must be a sequence of numbers ({e}).") from e
    if w.numel() != n:
        raise MoePruneError(f"merge weights give {w.numel()} numbers for a group of {n} experts; give one per member.")
    if not torch.isfinite(w).all():
        raise MoePruneError(f"merge weights must be finite, got {w.tolist()}.")
    if (w < 0).any():
        raise MoePruneError(f"merge weights must be >= 0 (usage frequencies), got {w.tolist()}.")
    if w.sum() <= 0:
        raise MoePruneError(f"merge weights must have a positive sum, got {w.tolist()}.")
    return w


def prepare_group(experts: list[Mapping[str, torch.Tensor]], weights: Sequence[float] | torch.Tensor,
                  anchor: int | None, align: bool) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, int]:
    """Shared by the merges: check the group and weights, pick the anchor (default: the largest weight) and align
    the members to it. Returns (members, normalised weights [n] summing to 1 (float64), anchor)."""
    check_group(experts)
    w = check_weights(weights, len(experts))
    if anchor is None:
        anchor = int(torch.argmax(w))  # first maximum
    elif isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < len(experts):
        raise MoePruneError(f"anchor {anchor!r} must be a member index 0..{len(experts) - 1}.")
    members = align_group(experts, anchor) if align and len(experts) > 1 else [dict(e) for e in experts]
    return members, w / w.sum(), anchor


def merge_average(experts: list[Mapping[str, torch.Tensor]], weights: Sequence[float] | torch.Tensor,
                  anchor: int | None = None, align: bool = True) -> dict[str, torch.Tensor]:
    """One expert: W = Σ w_i W_i / Σ w_i for every role, members aligned to the anchor first (align=True).

    experts: list of n role dicts (gate/up [I, H], down [H, I], optional gate_bias/up_bias [I], down_bias [H]),
    all with the same roles, shapes and dtypes. weights: n usage frequencies (>= 0, positive sum).
    Raises MoePruneError for an empty group, mismatched roles/shapes/dtypes, bad weights or anchor.
    """
    members, w, anchor = prepare_group(experts, weights, anchor, align)
    ref = experts[anchor]
    out: dict[str, torch.Tensor] = {}
    for role in ref:
        device = ref[role].device
        acc = torch.zeros(ref[role].shape, dtype=torch.float64, device=device)
        for wi, m in zip(w.tolist(), members, strict=True):
            if wi != 0.0:
                acc += wi * m[role].detach().to(device, torch.float64)
        out[role] = acc.to(ref[role].dtype)
    return out

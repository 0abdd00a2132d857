"""Data-free criteria: they need only the weights (or nothing)."""

from __future__ import annotations

import torch

from moeprune.criteria.base import criterion
from moeprune.criteria.weights import WeightSummary


@criterion("aimer", higher_keeps=False, needs="weights", reference="AIMER (ZongfangLiu/AIMER)")
def aimer(w: WeightSummary) -> torch.Tensor:
    """AIMER: mean|θ_j| / sqrt(mean θ_j²) over the expert's concatenated weights; higher = prune.

    The ratio is ≤ 1 (Cauchy–Schwarz) and measures how evenly the weight mass is spread; AIMER prunes the
    experts whose weights look most like dense noise (highest ratio).
    """
    mean_abs = w.abs_sum / w.numel
    rms = (w.sq_sum / w.numel).sqrt()
    return mean_abs / rms.clamp_min(torch.finfo(torch.float64).tiny)


@criterion("weight_norm", higher_keeps=True, needs="weights", reference="baseline")
def weight_norm(w: WeightSummary) -> torch.Tensor:
    """Weight norm: ‖θ_j‖₂ over the expert's concatenated weights; higher = keep."""
    return w.sq_sum.sqrt()


@criterion("random", higher_keeps=True, needs="none", reference="control")
def random(num_experts: int, seed: int, layer: int) -> torch.Tensor:
    """Random control: a seeded permutation score per layer (seed and layer index fix it)."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.rand(num_experts, generator=g, dtype=torch.float64)

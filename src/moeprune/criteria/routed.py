"""Calibrated expert-level criteria over `RoutedStats` (A_j = routed non-padding tokens of expert j;
g = the gate weight the model applied; f = the expert's output before the gate multiply). Experts never routed
to score 0 on the mean-based criteria, so they are pruned first."""

from __future__ import annotations

import torch

from moeprune.criteria.base import criterion
from moeprune.stats.routed import RoutedStats


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


@criterion("frequency", higher_keeps=True, needs="calibration", reference="MC-SMoE, NAEE baselines")
def frequency(s: RoutedStats) -> torch.Tensor:
    """Frequency: |A_j|, the number of routed tokens."""
    return s.sums["count"].clone()


@criterion("soft_frequency", higher_keeps=True, needs="calibration", reference="common baseline")
def soft_frequency(s: RoutedStats) -> torch.Tensor:
    """Soft frequency: Σ_{t∈A_j} g_j(t)."""
    return s.sums["gate_sum"].clone()


@criterion("ean_mean", higher_keeps=True, needs="calibration", reference="arXiv 2606.15716 (MAN)")
def ean_mean(s: RoutedStats) -> torch.Tensor:
    """EAN mean: mean_{t∈A_j} ‖f_j(t)‖."""
    return _mean(s.sums["norm_sum"], s.sums["count"])


@criterion("ean_sum", higher_keeps=True, needs="calibration", reference="REAP paper baselines")
def ean_sum(s: RoutedStats) -> torch.Tensor:
    """EAN sum: Σ_{t∈A_j} ‖f_j(t)‖."""
    return s.sums["norm_sum"].clone()


@criterion("msan", higher_keeps=True, needs="calibration", reference="arXiv 2606.15716")
def msan(s: RoutedStats) -> torch.Tensor:
    """MSAN: mean_{t∈A_j} ‖f_j(t)‖²."""
    return _mean(s.sums["sq_norm_sum"], s.sums["count"])


@criterion("reap", higher_keeps=True, needs="calibration", reference="REAP (Cerebras, ICLR 2026)")
def reap(s: RoutedStats) -> torch.Tensor:
    """REAP: mean_{t∈A_j} g_j(t)·‖f_j(t)‖."""
    return _mean(s.sums["gate_norm_sum"], s.sums["count"])


@criterion("max_activation", higher_keeps=True, needs="calibration", reference="REAP code (super experts)")
def max_activation(s: RoutedStats) -> torch.Tensor:
    """Max activation: max over routed tokens of |f_j(t)| entries (finds super experts)."""
    return s.sums["max_abs"].clone()


@criterion("easy_ep", higher_keeps=True, needs="calibration", reference="EASY-EP (few-shot domain calibration)")
def easy_ep(s: RoutedStats) -> torch.Tensor:
    """EASY-EP: Σ_{t∈A_j} g_j(t)·‖f_j(t)‖·max(0, 1 − cos(h_t, h_t + r_t)), h_t = MoE input, r_t = routed output."""
    return s.sums["easy_ep_sum"].clone()


@criterion("tcess", higher_keeps=True, needs="calibration", reference="PreMoe (TCESS)")
def tcess(s: RoutedStats) -> torch.Tensor:
    """TCESS: (1/T) Σ_t p_j(t)·1[j ∈ TopK(t)], p = the router's distribution over all experts."""
    return s.sums["prob_topk_sum"] / s.sums["tokens"].clamp_min(1)


@criterion("tcess_top1", higher_keeps=True, needs="calibration", reference="PreMoe released code (top-1 marker)")
def tcess_top1(s: RoutedStats) -> torch.Tensor:
    """TCESS, top-1 form: (1/T) Σ_t p_j(t)·1[j = argmax_e p_e(t)]."""
    return s.sums["prob_top1_sum"] / s.sums["tokens"].clamp_min(1)

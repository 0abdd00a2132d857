"""Neuron-level criteria: a score per (expert j, neuron k) from `stats.neurons` sums; higher = keep.

    heapr:   S_{j,k} = (act_sq[j,k] / N_j) · (grad_sq[j,k] / N_j)            = mean_t h_{t,k}² · w_kᵀ M_j w_k
    camera:  I_{j,k} = down_sq[j,k] · [(1 − ρ) · gact_sq[j,k] + ρ · gact_max[j,k]]   (CAMERA-P, ρ = 0.9)

(definitions of the sums in `stats/neurons.py`). Experts that saw no token score 0 everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeprune.errors import MoePruneError
from moeprune.registry import Registry
from moeprune.stats.neurons import NeuronLayerStats


@dataclass(frozen=True)
class NeuronCriterion:
    name: str
    fn: Callable[..., torch.Tensor]  # (NeuronLayerStats, **params) -> [E, I]
    needs_gradients: bool
    reference: str


NEURON_CRITERIA: Registry[NeuronCriterion] = Registry("neuron criterion", "Neuron criteria: heapr, camera.")


def _heapr(s: NeuronLayerStats) -> torch.Tensor:
    if not s.sums["grad_count"].any():
        raise MoePruneError("heapr needs gradient statistics: collect them with gradients=True (a backward pass).")
    n = s.sums["count"].clamp_min(1)[:, None]  # [E, 1]
    ng = s.sums["grad_count"].clamp_min(1)[:, None]
    return (s.sums["act_sq"] / n) * (s.sums["grad_sq"] / ng)


def _camera(s: NeuronLayerStats, rho: float = 0.9) -> torch.Tensor:
    if not 0.0 <= rho <= 1.0:
        raise MoePruneError(f"CAMERA-P rho must lie in [0, 1], got {rho}.")
    return s.sums["down_sq"] * ((1 - rho) * s.sums["gact_sq"] + rho * s.sums["gact_max"])


NEURON_CRITERIA.register("heapr", NeuronCriterion("heapr", _heapr, True, "HEAPr (atomic experts, output Fisher)"))
NEURON_CRITERIA.register("camera", NeuronCriterion("camera", _camera, False, "CAMERA-P (micro-expert energy)"))


def neuron_scores(method: str, stats: dict[int, NeuronLayerStats], **params) -> dict[int, torch.Tensor]:
    """{MoE layer: scores [E, I]} for `method`."""
    crit = NEURON_CRITERIA.get(method)
    return {layer: crit.fn(s, **params) for layer, s in sorted(stats.items())}

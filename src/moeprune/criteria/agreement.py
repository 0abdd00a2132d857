"""How far the criteria agree: for every pair (a, b) of criteria, the mean over MoE layers of the overlap of the
expert sets they keep at one ratio,

    agreement(a, b) = mean_ℓ |K_a(ℓ) ∩ K_b(ℓ)| / |K(ℓ)|        (1 = same experts kept, ~ (1 − ratio) = chance)

with K chosen by the uniform policy. `random` is included as the chance-level control.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.criteria.base import CRITERIA
from moeprune.select.build import layer_scores
from moeprune.select.uniform import drop_count, select_uniform
from moeprune.stats.store import ExpertStats, StatsView


@dataclass
class Agreement:
    methods: list[str]
    matrix: torch.Tensor  # [M, M] mean kept-set overlap
    per_layer: dict[int, torch.Tensor]  # layer -> [M, M]
    ratio: float

    def format(self) -> str:
        w = max(len(m) for m in self.methods)
        head = " " * (w + 1) + " ".join(f"{m[:8]:>8}" for m in self.methods)
        rows = [f"{m:<{w}} " + " ".join(f"{float(v):8.2f}" for v in self.matrix[i])
                for i, m in enumerate(self.methods)]
        return (f"kept-set overlap at ratio {self.ratio} (uniform policy; 1 = identical, "
                f"~{1 - self.ratio:.2f} = chance)\n" + "\n".join([head, *rows]))


def agreement(stats: ExpertStats, ratio: float, calib_set: list[str] | None = None, seed: int = 0) -> Agreement:
    view = StatsView(stats)
    routing = view.routing()
    drop_count(ratio, view.num_experts, routing)
    methods = [name for name, c in CRITERIA.items() if c.needs in ("calibration", "none")]
    kept: dict[str, dict[int, set[int]]] = {}
    for name in methods:
        crit = CRITERIA.get(name)
        scores = layer_scores(crit, view, None, seed, calib_set if crit.needs == "calibration" else None)
        kept[name] = {k: set(v) for k, v in select_uniform(scores, ratio, routing, crit.higher_keeps).items()}
    M = len(methods)
    per_layer = {}
    for layer in stats.layers:
        m = torch.zeros(M, M, dtype=torch.float64)  # [M, M]
        for i, a in enumerate(methods):
            for j, b in enumerate(methods):
                m[i, j] = len(kept[a][layer] & kept[b][layer]) / len(kept[a][layer])
        per_layer[layer] = m
    matrix = torch.stack(list(per_layer.values())).mean(dim=0)  # [M, M]
    return Agreement(methods, matrix, per_layer, ratio)

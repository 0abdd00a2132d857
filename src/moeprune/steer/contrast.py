"""The fTRI contrast of MoTE: which experts a behaviour's text routes to more (or less) than matched text without it.

Per MoE layer l and expert j, from the routed statistics `moeprune calibrate` collects (`stats.routed`: count =
tokens whose top-k holds j, gate_sum = Σ of j's gate weight over those tokens, tokens = real tokens), summed over
the sets of each group (A = `--with`, B = `--without`):

    f_A = count_A / n_A,   f_B = count_B / n_B           routing frequency (fraction of tokens routed to j)
    m_A = gate_sum_A / n_A, m_B = gate_sum_B / n_B        gate mass per token
    Δf = f_A − f_B,  Δm = m_A − m_B
    z  = Δf / sqrt(p̂ (1 − p̂) (1/n_A + 1/n_B)),  p̂ = (count_A + count_B) / (n_A + n_B)   (two-proportion z-score;
                                                           0 when p̂ is 0 or 1)

Experts are ranked by Δf (largest first: the experts the behaviour uses more, MoTE's "behaviour experts"); only
those with z >= `min_z` qualify. The z-score treats tokens as independent draws, which neighbouring tokens of one
text are not (routing is locally consistent), so it overstates significance: read it as a ranking filter that
drops differences a handful of tokens could make, not as a p-value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moeprune.errors import MoePruneError
from moeprune.stats.store import ExpertStats


@dataclass(frozen=True)
class ExpertContrast:
    layer: int
    expert: int
    freq_with: float
    freq_without: float
    d_freq: float
    mass_with: float
    mass_without: float
    d_mass: float
    z: float

    def to_dict(self) -> dict:
        return asdict(self)


def ftri_contrast(stats: ExpertStats, with_sets: list[str], without_sets: list[str]) -> list[ExpertContrast]:
    """Every (layer, expert) of `stats`, layer by layer, experts in order (see the module docstring)."""
    if not with_sets or not without_sets:
        raise MoePruneError("the contrast needs at least one set with the behaviour and one without it.")
    both = set(with_sets) & set(without_sets)
    if both:
        raise MoePruneError(f"sets {sorted(both)} are on both sides of the contrast; each set goes to one side.")
    a, b = stats.combined(list(with_sets)), stats.combined(list(without_sets))
    out = []
    for layer in stats.layers:
        sa, sb = a[layer].sums, b[layer].sums
        n_a, n_b = float(sa["tokens"].item()), float(sb["tokens"].item())
        if n_a <= 0 or n_b <= 0:
            raise MoePruneError(f"layer {layer}: a side of the contrast has no token ({n_a:.0f} with, {n_b:.0f} "
                                "without); give each side some text.")
        for j in range(stats.num_experts):
            c_a, c_b = float(sa["count"][j]), float(sb["count"][j])
            f_a, f_b = c_a / n_a, c_b / n_b
            p = (c_a + c_b) / (n_a + n_b)
            var = p * (1 - p) * (1 / n_a + 1 / n_b)
            z = (f_a - f_b) / math.sqrt(var) if var > 0 else 0.0
            m_a, m_b = float(sa["gate_sum"][j]) / n_a, float(sb["gate_sum"][j]) / n_b
            out.append(ExpertContrast(layer, j, f_a, f_b, f_a - f_b, m_a, m_b, m_a - m_b, z))
    return out


def top_experts(contrast: list[ExpertContrast], n: int, min_z: float = 3.0) -> list[ExpertContrast]:
    """The `n` experts of largest Δf across layers whose z >= min_z (fewer when fewer qualify); ties by layer, then
    expert index."""
    if n < 1:
        raise MoePruneError(f"--top must be >= 1, got {n}.")
    found = [c for c in contrast if c.z >= min_z and c.d_freq > 0]
    return sorted(found, key=lambda c: (-c.d_freq, c.layer, c.expert))[:n]

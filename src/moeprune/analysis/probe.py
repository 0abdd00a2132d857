"""Redundancy probe: what dropping the *cheapest* experts of a layer is predicted to cost, and what it costs.

Cheapest plan at ratio r (per MoE layer ℓ, uniform policy, group-equal for group-limited routers): drop the
n_drop(r) experts with the least routed output mass m_e = gate_norm_sum_e = Σ_{t routed to e} g_e(t)·‖f_e(t)‖
(all calibration sets together). Then

    predicted(ℓ, r) = Σ_{e ∈ D} m_e / Σ_e m_e                       (share of the routed output mass removed)
    measured(ℓ, r)  = Σ_t ‖Z_t − MoE_{E∖D}(X_t)‖² / Σ_t ‖Z_t‖²      (relative squared error of the block output)

X, Z: the MoE block's input and output on the real tokens cached during the calibration pass; MoE_{E∖D} is the
model's own block with D masked in its own router (the dropped experts' tokens re-route to their next choices),
and shared experts (part of Z) dilute the error. The two are different scales (a share of Σ‖·‖ vs a ratio of
squared norms) and need not agree; measured can exceed 1 where re-routed tokens land far from Z. Each layer is
probed alone: later layers see the unpruned model. Per domain d the same D is scored on d's tokens only. The block
runs only on the tokens whose routing D changes (`select/rerouted.py`: the others' outputs are unchanged, and which
ones change is read off the model's own router): over the ratios 0.1–0.75, 47–59 % of the probe tokens on the
trained testbed and 6–23 % on the big-model benchmark's random checkpoint, whose analyze went from 2.09x to 1.43x
its plain layer-by-layer forward (benchmarks/RESULTS.md).

Both are measured on at most `PROBE_TOKENS` real tokens per domain and layer (every ⌈N/cap⌉-th; `--probe-tokens`),
their sums scaled by N/kept so that domains combine in proportion to their token counts.

Task plans (`MeasuredProbe(criterion=NAME)`, used by `moeprune sweep`): instead of the one cheapest plan, every
domain d gets its own plan D_d(ℓ, r) — the calibrated criterion's uniform selection on d's statistics only (exactly
what `select.build.build_plan(stats, NAME, r, calib_set=[d])` keeps) — and measured(ℓ, r) on d's tokens is the
error of D_d. The all-domain figure `measured(ℓ)` then mixes the domains' own plans.

Cliff of a layer: the first probed ratio whose measured error exceeds CLIFF (default 0.1: the layer loses more than
a tenth of its output energy); None when every ratio stays below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.calibration.session import BlockIO
from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.models.routing import RoutingSpec
from moeprune.select.naee_outputs import keep_stride
from moeprune.select.rerouted import ReroutedEvaluator
from moeprune.select.uniform import drop_count, select_uniform
from moeprune.stats.routed import RoutedStats

CLIFF = 0.1
# Real tokens per domain and layer the probe measures on (an evenly strided subset above it; 0 / None = all). Each
# probed ratio is one MoE-block forward over the tokens it re-routes (at most all of them) plus a router pass, so the
# probe costs at most about R·PROBE_TOKENS/T of the pass's MoE work.
# Chosen on the trained testbed (4 domains × 8 192 tokens, 4 layers, ratios 0.1–0.75): against every token, caps of
# 2 048 / 1 024 / 512 / 256 moved the 64 per-domain errors by a median 2.5 / 5.3 / 7.5 / 11 % (relative) and changed
# no layer's cliff; see benchmarks/RESULTS.md.
PROBE_TOKENS = 1024


def check_ratios(ratios: Sequence[float], num_experts: int | None = None,
                 routing: RoutingSpec | None = None) -> tuple[list[float], dict[str, str]]:
    """Sorted distinct ratios, and with the model's E and routing: (usable ratios, {ratio: why skipped}).

    Every ratio must lie strictly between 0 and 1; ratios this router cannot express (0 experts dropped, fewer
    than top-k kept, too few per group) are skipped with the reason; none usable is an error."""
    values = sorted({float(r) for r in ratios})
    if not values:
        raise MoePruneError("no --ratios given; pass fractions like --ratios 0.1,0.25,0.5.")
    bad = [r for r in values if not 0.0 < r < 1.0]
    if bad:
        raise MoePruneError(f"--ratios {bad}: every ratio is a fraction of experts strictly between 0 and 1 "
                            "(e.g. --ratios 0.1,0.25,0.5,0.75).")
    if num_experts is None or routing is None:
        return values, {}
    usable, skipped = [], {}
    for r in values:
        try:
            drop_count(r, num_experts, routing)
            usable.append(r)
        except MoePruneError as e:
            skipped[str(r)] = str(e)
    if not usable:
        raise MoePruneError(f"none of --ratios {values} can be applied to this model ({num_experts} experts, "
                            f"{routing.describe()}): {'; '.join(skipped.values())}")
    return usable, skipped


def cheapest_drop(mass: torch.Tensor, ratio: float, routing: RoutingSpec) -> list[int]:
    """Experts with the least routed output mass [E] (uniform policy: same drop per group; ties drop the higher
    index)."""
    return uniform_drop(mass, ratio, routing, higher_keeps=True)


def uniform_drop(scores: torch.Tensor, ratio: float, routing: RoutingSpec, higher_keeps: bool) -> list[int]:
    """The experts the uniform policy drops from one layer's scores [E] (ascending)."""
    kept = set(select_uniform({0: scores.double()}, ratio, routing, higher_keeps=higher_keeps)[0])
    return [e for e in range(scores.numel()) if e not in kept]


def criterion_drops(criterion: str, stats: dict[str, RoutedStats], ratios: list[float],
                    routing: RoutingSpec) -> dict[str, list[list[int]]]:
    """{domain: [dropped experts per ratio]}: the calibrated criterion's uniform plan on each domain's statistics."""
    from moeprune.criteria import CRITERIA

    crit = CRITERIA.get(criterion)
    return {name: [uniform_drop(crit.fn(s), r, routing, crit.higher_keeps) for r in ratios]
            for name, s in stats.items()}


def predicted_cost(mass: torch.Tensor, dropped: list[int]) -> float:
    """Σ_{e∈D} m_e / Σ_e m_e (0 when the layer saw no routed mass)."""
    total = float(mass.double().sum())
    return float(mass.double()[dropped].sum()) / total if total > 0 else 0.0


def predictions(stats: dict[str, dict[int, RoutedStats]], combined: dict[int, RoutedStats], layers: list[int],
                ratios: list[float], routing: RoutingSpec) -> dict:
    """Cheapest plan per layer and ratio ([L][R] expert lists) and its predicted cost overall and per domain."""
    dropped, pred = [], []
    per_domain: dict[str, list[list[float]]] = {name: [] for name in stats}
    for layer in layers:
        mass = combined[layer].sums["gate_norm_sum"]  # [E]
        plans = [cheapest_drop(mass, r, routing) for r in ratios]
        dropped.append(plans)
        pred.append([predicted_cost(mass, d) for d in plans])
        for name, by_layer in stats.items():
            m = by_layer[layer].sums["gate_norm_sum"]  # [E]
            per_domain[name].append([predicted_cost(m, d) for d in plans])
    return {"ratios": ratios, "dropped": dropped, "predicted": pred, "predicted_per_domain": per_domain}


def cliff(ratios: list[float], errors: list[float], threshold: float = CLIFF) -> float | None:
    """First ratio whose measured error exceeds `threshold`; None when none does."""
    return next((r for r, e in zip(ratios, errors, strict=True) if e > threshold), None)


def sample(x: torch.Tensor, z: torch.Tensor, cap: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Every ⌈N/cap⌉-th row of x, z [N, H] (all of them when cap is None or N ≤ cap), and the weight N / kept that
    puts the subset's sums back on the scale of all N tokens (so domains of different sizes combine as before)."""
    n = x.shape[0]
    if not cap or n <= cap:
        return x, z, 1.0
    stride, kept = keep_stride(n, cap)  # the same evenly strided subset NAEE's search keeps
    return x[::stride], z[::stride], n / kept


@dataclass
class MeasuredProbe:
    """A `decide` hook for `calibration.session.collect`: measures every layer's cheapest plans on the cached block
    inputs/outputs, then returns [] so the pass goes on unpruned. Results: per layer {domain: [(err, ref)] per ratio}.
    With `criterion`, each domain is measured with its own plan of that calibrated criterion (module docstring).
    """

    ratios: list[float]
    routing: RoutingSpec
    device: str = "cpu"  # where the block runs for the probe (it is moved back afterwards)
    max_tokens: int | None = PROBE_TOKENS  # per domain and layer; None or 0: every real token (`sample`)
    criterion: str | None = None  # None: the cheapest plan for every domain; a name: each domain's own plan
    errors: dict[int, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    dropped: dict[int, list[list[int]]] = field(default_factory=dict)  # cheapest plans (criterion None)
    dropped_per_domain: dict[int, dict[str, list[list[int]]]] = field(default_factory=dict)  # criterion plans

    def plans(self, layer: int, stats: dict[str, RoutedStats]) -> dict[str, list[list[int]]]:
        """{domain: [dropped experts per ratio]} to measure on each domain's tokens, recorded on the probe."""
        if self.criterion is not None:
            self.dropped_per_domain[layer] = criterion_drops(self.criterion, stats, self.ratios, self.routing)
            return self.dropped_per_domain[layer]
        mass = sum(s.sums["gate_norm_sum"] for s in stats.values())  # [E] all sets
        self.dropped[layer] = [cheapest_drop(mass, r, self.routing) for r in self.ratios]
        return dict.fromkeys(stats, self.dropped[layer])

    def __call__(self, model: nn.Module, adapter: MoEAdapter, layer: int, stats: dict[str, RoutedStats],
                 io: BlockIO) -> list[int]:
        plans = self.plans(layer, stats)
        by_domain: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for x, z, v, tag in zip(io.inputs, io.outputs, io.valid, io.tags, strict=True):
            xs, zs = by_domain.setdefault(tag, ([], []))
            xs.append(x[v])  # [N, H] real tokens only (the MoE block is per token)
            zs.append(z[v])  # [N, H]
        self.errors[layer] = {}
        block = adapter.block(model, layer)
        home = next(block.parameters()).device
        block.to(self.device)
        run = seen = 0  # probe tokens the block ran on / scored, over every domain and ratio
        try:
            for tag, (xs, zs) in by_domain.items():
                x, z, weight = sample(torch.cat(xs), torch.cat(zs), self.max_tokens)  # [n, H] each
                evaluate = ReroutedEvaluator(model, adapter, layer, x, z)
                ref = float(z.double().square().sum())  # Σ ‖Z‖²
                self.errors[layer][tag] = [(weight * evaluate(tuple(d)), weight * ref) for d in plans[tag]]
                run += evaluate.tokens_run
                seen += evaluate.tokens_seen
        finally:
            block.to(home)
        logger.info("layer %d: %s plans at ratios %s cost %s of the MoE output (relative squared error; the block "
                    "ran on the %.0f%% of probe tokens they re-route)", layer, self.criterion or "cheapest",
                    self.ratios, ", ".join(f"{e:.3g}" for e in self.measured(layer)), 100 * run / max(seen, 1))
        return []

    def measured(self, layer: int, domain: str | None = None) -> list[float]:
        """Relative error per ratio on one domain's tokens, or (None) on all tokens."""
        parts = [v for d, v in self.errors[layer].items() if domain is None or d == domain]
        out = []
        for i in range(len(self.ratios)):
            err, ref = sum(p[i][0] for p in parts), sum(p[i][1] for p in parts)
            out.append(err / ref if ref > 0 else 0.0)
        return out

"""DERN's threshold chosen from the data (`threshold: auto`): a quantile of the segment similarities.

Segment k of dropped expert d has similarity s_{d,k} = max over every survivor neuron of cos(φ_{d,k}, φ_{s,k'})
(`dern.dern_best`, the quantity the merge thresholds). With the recombined fraction ρ (`recombine`) and the N
dropped segments of a layer (all layers together when `pooled`), sorted v_1 >= v_2 >= ... >= v_N:

    m = round(ρ·N),   α = (v_m + v_{m+1}) / 2        (v_0 = 1, v_{N+1} = −1)

so exactly m segments pass `cos >= α` (more only on exact ties), and α lies half a gap away from both neighbours:
the similarities recomputed when the plan is applied (another machine, another summation order) land on the same
side of it. The plan records α per layer (or one pooled α) and the counts `recombined[layer] = [n, N]`; the merge
only ever reads the recorded α. A layer (or the whole model) where fewer than FEW of the dropped segments were
recombined is plain expert pruning under another name: `warn_if_few` says so and what to change. ρ = 0 (the
default) needs no similarity at all: the plan records threshold None and the merge skips the scan
(`recombine_none`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from moeprune.log import logger
from moeprune.merge.dern import Expert, dern_best
from moeprune.merge.plan import MergePlan

# Measured (benchmarks/merge_quality.py --dern-sweep, benchmarks/RESULTS.md) on the testbed and on a held-out
# 32-expert model, 25 % and 50 % of the experts dropped, against ρ = 0: ρ = ¼ raised the calibration block error in
# 14 of 16 (model, ratio, layer) cases and the held-out perplexity ratio in 3 of 4 rows; ρ >= ½ raised both in
# every case. ρ = 0 also beat the old fixed cosine 0.4 on all four rows.
# So by default DERN recombines nothing (it prunes the dropped experts, without the similarity scan) and says so;
# `recombine` asks for more.
DEFAULT_RECOMBINE = 0.0
POOLED = False  # one α per layer: lower perplexity than one pooled α in 11 of 12 measured rows
FEW = 0.05  # warn below this share of recombined segments (per layer or overall)


def layer_similarities(experts: Sequence[Expert], groups: list[list[int]]) -> torch.Tensor:
    """[N] float64: the best survivor cosine of every dropped neuron segment of one layer (N = dropped·I)."""
    dropped = sorted(j for g in groups for j in g[1:])
    if not dropped:
        return torch.zeros(0, dtype=torch.float64)
    best = dern_best(experts, [g[0] for g in groups], dropped)
    return torch.cat([best[d][0] for d in dropped])  # [N]


def quantile_threshold(sims: torch.Tensor, rho: float) -> float:
    """α with round(ρ·N) of `sims` at or above it, half-way between the last one taken and the first one left."""
    v = torch.cat([sims.new_ones(1), sims.sort(descending=True).values, -sims.new_ones(1)])  # [N + 2] v_0..v_{N+1}
    m = round(rho * sims.numel())
    return float((v[m] + v[m + 1]) / 2)


def choose_thresholds(sims: dict[int, torch.Tensor], rho: float, pooled: bool = POOLED) -> float | dict[int, float]:
    """One α per layer (`pooled` False) or one α for all layers, recombining the fraction ρ (module docstring)."""
    if pooled:
        return quantile_threshold(torch.cat(list(sims.values())), rho)
    return {layer: quantile_threshold(s, rho) for layer, s in sorted(sims.items())}


def counts(sims: dict[int, torch.Tensor], threshold: float | dict[int, float]) -> dict[int, list[int]]:
    """recombined[layer] = [segments with cos >= α of that layer, dropped segments of that layer]."""
    at = threshold if isinstance(threshold, dict) else dict.fromkeys(sims, threshold)
    return {layer: [int((s >= at[layer]).sum()), s.numel()] for layer, s in sorted(sims.items())}


def resolve(plan: MergePlan, layers: Iterable[tuple[int, Sequence[Expert]]], recombine: float | None,
            pooled: bool = POOLED) -> MergePlan:
    """`plan` (a dern merge) with its threshold(s) and recombined counts filled in from the layers' experts
    (`layers` yields (layer, every expert of it) for the plan's layers: one similarity scan per layer).
    `recombine` None keeps the plan's fixed threshold and only counts; a fraction chooses α from the data; 0 needs
    no similarities (`recombine_none`: `layers` is not read)."""
    if recombine == 0:
        return recombine_none(plan)
    sims: dict[int, torch.Tensor] = {}
    bar = tqdm(layers, total=len(plan.layers), leave=False)
    for n, (layer, experts) in enumerate(bar):
        bar.set_description(f"DERN segment similarities (layer {n + 1}/{len(plan.layers)})")
        if layer in plan.groups:
            sims[layer] = layer_similarities(experts, plan.groups[layer])
    if recombine is not None:
        plan.threshold, plan.recombine = choose_thresholds(sims, recombine, pooled), float(recombine)
    plan.recombined = counts(sims, plan.threshold)
    for layer, (n, of) in plan.recombined.items():
        logger.info("DERN layer %d: %d of %d dropped neuron segments recombined (cos >= %.3f)", layer, n, of,
                    plan.threshold_of(layer))
    warn_if_few(plan)
    return plan


def recombine_none(plan: MergePlan) -> MergePlan:
    """`plan` recombining no segment (threshold None, recombine 0): the dropped experts are pruned, and no layer's
    weights are read for similarities (their scan is E_d·E_s·I²·3H multiply-adds per layer, `dern.dern_best`)."""
    plan.threshold, plan.recombine, plan.recombined = None, 0.0, None
    logger.warning("DERN with recombine 0 (the default) recombines no neuron segment of the dropped experts: this is "
                   "plain pruning of the dropped experts, kept by router statistics (recombining raised the "
                   "perplexity ratio on the testbed and a held-out model, benchmarks/RESULTS.md). To recombine, set "
                   "--recombine FRACTION (e.g. 0.25); to prune, also compare an expert criterion (e.g. --method "
                   "tcess_top1).")
    return plan


def warn_if_few(plan: MergePlan) -> bool:
    """Warn (and return True) when fewer than FEW of the dropped segments were recombined in a layer or overall."""
    if not plan.recombined:
        return False
    few = [layer for layer, (n, of) in plan.recombined.items() if of and n < FEW * of]
    moved, total = (sum(x[i] for x in plan.recombined.values()) for i in (0, 1))
    if not few and moved >= FEW * total:
        return False
    where = ", ".join(f"layer {layer}: {plan.recombined[layer][0]}/{plan.recombined[layer][1]}" for layer in few)
    if plan.recombine is None:
        fix = ("To recombine more, use --threshold auto with --recombine FRACTION (the share of segments to "
               "recombine), or a lower --threshold.")
    elif plan.recombine < FEW:
        fix = (f"recombine {plan.recombine:g} asks for that. To recombine, set --recombine FRACTION (e.g. 0.25); to "
               "prune, also compare an expert criterion (e.g. --method tcess_top1).")
    else:
        fix = f"To recombine more, raise --recombine (now {plan.recombine:g})."
    logger.warning("DERN recombined %d of %d dropped neuron segments (%.1f%%; %s): where that is few this is plain "
                   "pruning of the dropped experts, kept by router statistics. %s", moved, total,
                   100 * moved / max(total, 1), where or "every layer", fix)
    return True

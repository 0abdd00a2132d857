"""What a statistics file says about routing, per MoE layer and calibration set (domain d), as JSON-ready numbers.

Notation: count_d(ℓ, e) = tokens of domain d whose top-k holds expert e in layer ℓ; tokens_d = real tokens of d.

    usage_d(ℓ, e)   = count_d(ℓ, e) / tokens_d        (fraction of d's tokens that use e; Σ_e usage = k)
    balance         = usage entropy (bits, and ÷ log2 E) and CV = σ/μ of count_d(ℓ, ·)     (`balance.py`)
    specialisation  = domain_specificity of the rates count_d(ℓ, e) / tokens_d: per expert 1 − H(q[·|e]) / log2 D,
                      owner = argmax_d q[d|e], layer score = usage-weighted mean                (`balance.py`)
    co-activation   = lift[i, j] = coact[i, j] · T / (coact[i, i] · coact[j, j])  on all domains together
    super experts   = `select.protect.super_experts` on max |f| over all domains

Every per-layer list follows `layers` (the MoE layer indices, ascending); "all" = every domain together.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moeprune.analysis.balance import coactivation_lift, coefficient_of_variation, domain_specificity, usage_entropy
from moeprune.select.protect import MAX_FRACTION, PERCENTILE, super_experts
from moeprune.stats.routed import RoutedStats
from moeprune.stats.store import ExpertStats

SPECIALIST = 0.5  # an expert with domain specificity >= this is called a specialist of its owner
MIN_PAIR_COUNT = 10  # co-activation pairs seen fewer times are too noisy to list among the top lifts
TOP_PAIRS = 5


def _floats(t: torch.Tensor, digits: int | None = None) -> list:
    """Tensor -> nested lists of floats; NaN -> None (JSON has no NaN); optional rounding."""
    if t.dim() == 0:
        v = float(t)
        return None if math.isnan(v) else (round(v, digits) if digits is not None else v)  # type: ignore[return-value]
    return [_floats(x, digits) for x in t]


def domain_layers(stats: ExpertStats) -> dict[str, dict[int, RoutedStats]]:
    """{"all": combined, **one entry per set} — the views every section reports."""
    return {"all": stats.combined(), **stats.sets}


def usage(stats: ExpertStats) -> dict[str, Any]:
    """usage_d(ℓ, e) per domain and for all domains together: [L][E] each."""
    out: dict[str, Any] = {}
    for name, layers in domain_layers(stats).items():
        rows = []
        for layer in stats.layers:
            s = layers[layer].sums
            tokens = float(s["tokens"].item())
            rows.append(_floats(s["count"] / tokens) if tokens > 0 else [0.0] * stats.num_experts)
        out[name] = rows
    return {"per_domain": {k: v for k, v in out.items() if k != "all"}, "all": out["all"]}


def balance(stats: ExpertStats) -> dict[str, Any]:
    """Entropy (bits, normalised) and CV of count(ℓ, ·), per layer [L], per domain and for all."""
    out: dict[str, Any] = {}
    for name, layers in domain_layers(stats).items():
        counts = torch.stack([layers[layer].sums["count"] for layer in stats.layers])  # [L, E]
        if float(counts.sum(1).min()) <= 0:
            out[name] = {"skipped": f"set {name!r} has a layer without routed tokens"}
            continue
        ent = usage_entropy(counts)
        out[name] = {"entropy_bits": _floats(ent.bits), "entropy_normalized": _floats(ent.normalized),
                     "cv": _floats(coefficient_of_variation(counts))}
    return {"per_domain": {k: v for k, v in out.items() if k != "all"}, "all": out["all"],
            "entropy_max_bits": math.log2(stats.num_experts)}


def specialisation(stats: ExpertStats) -> dict[str, Any]:
    """Per layer: specificity per expert [L][E], owner (domain name, None when unused) [L][E], layer score [L];
    per domain the experts it owns and its specialists (owner with specificity >= SPECIALIST), [L] lists each."""
    names = list(stats.sets)
    if len(names) < 2:
        return {"skipped": f"one calibration set ({names[0]!r}); specialisation compares domains: pass two or more "
                           "--calib NAME=PATH sets"}
    per_expert, owners, layer_score = [], [], []
    owned: dict[str, list[list[int]]] = {n: [] for n in names}
    specialists: dict[str, list[list[int]]] = {n: [] for n in names}
    for layer in stats.layers:
        counts = torch.stack([stats.sets[n][layer].sums["count"] for n in names])  # [D, E]
        tokens = torch.stack([stats.sets[n][layer].sums["tokens"][0] for n in names])  # [D]
        ds = domain_specificity(counts, tokens)
        per_expert.append(_floats(ds.per_expert))
        owner = [names[int(o)] if int(o) >= 0 else None for o in ds.owner]
        owners.append(owner)
        layer_score.append(ds.layer)
        for d in names:
            mine = [e for e, o in enumerate(owner) if o == d]
            owned[d].append(mine)
            specialists[d].append([e for e in mine if float(ds.per_expert[e]) >= SPECIALIST])
    return {"per_expert": per_expert, "owner": owners, "layer": layer_score, "owned": owned,
            "specialists": specialists, "specialist_threshold": SPECIALIST}


def coactivation(stats: ExpertStats) -> dict[str, Any]:
    """lift [L][E][E] (diagonal None; 4 decimals) on all domains, and the top pairs of each layer."""
    lifts, tops = [], []
    combined = stats.combined()
    for layer in stats.layers:
        s = combined[layer].sums
        tokens = float(s["tokens"].item())
        if tokens <= 0:
            lifts.append(None)
            tops.append([])
            continue
        lift = coactivation_lift(s["coact"], tokens)  # [E, E]
        lifts.append(_floats(lift, 4))
        i, j = torch.triu_indices(*lift.shape, offset=1)
        ok = s["coact"][i, j] >= MIN_PAIR_COUNT
        order = torch.argsort(lift[i, j].masked_fill(~ok, -1.0), descending=True)[:TOP_PAIRS]
        tops.append([{"experts": [int(i[o]), int(j[o])], "lift": float(lift[i[o], j[o]]),
                      "count": int(s["coact"][i[o], j[o]])} for o in order if ok[o]])
    return {"lift": lifts, "top_pairs": tops, "min_pair_count": MIN_PAIR_COUNT}


def supers(stats: ExpertStats) -> dict[str, Any]:
    """Super experts per layer [L] lists, max |f| per expert [L][E] and the threshold τ (see select.protect)."""
    combined = stats.combined()
    max_abs = {layer: combined[layer].sums["max_abs"] for layer in stats.layers}
    found = super_experts(max_abs)
    values = torch.cat([max_abs[layer].double() for layer in stats.layers])  # [L·E]
    tau = max(float(torch.quantile(values, PERCENTILE / 100)), float(values.max()) * MAX_FRACTION)
    return {"experts": [sorted(found.get(layer, set())) for layer in stats.layers],
            "max_abs": [_floats(max_abs[layer].double()) for layer in stats.layers], "threshold": tau}

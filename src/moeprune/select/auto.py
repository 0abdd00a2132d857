"""`method: auto`: choose the expert-removal method per model (or per layer, where that is better) from ONE
calibration run, judged on calibration windows held apart from the windows that score the candidates.
This module holds the candidates and the choice; `pipeline/auto.py:plan_auto` runs the steps on the model.

    scoring, judge = split_judge(sets, judge_windows)                      (`pipeline/judge.py`)
    stats          = calibrate(model, scoring)                             the one calibration pass
    candidates     = {c: build_plan(stats, c, ratio)  for every calibrated criterion c}   (uniform policy)
                     ∪ {naee_reconstruction}  where affordable (`select/auto_naee.py`: its own progressive pass)
    judge windows of each set = first half A ∪ second half B
    err_c(ℓ)       = mean_s ‖Y − Ŷ_c‖² / ‖Y‖²  per MoE layer on A (`judge.block_errors`)
    per_layer      = layer by layer, the dropped set of argmin_c err_c(ℓ)   (when it differs from every candidate)
    nll_c          = masked model's NLL on A ∪ B, mean over sets of the per-token NLL (`judge.judged_nll`),
                     for every candidate (or the `nll_candidates` of lowest mean_ℓ err_c(ℓ))
    best           = argmin_c nll_c;   chosen = per_layer  if nll_per_layer(B) < nll_best(B)  else best
The composition is chosen on A, so only B (text that did not choose it) can say whether it beats the best single
candidate. Candidates that drop the same experts everywhere are judged once (`same_as`). The plan's `method` is
the chosen criterion ("naee_reconstruction", or "auto:per_layer"); `plan.auto` holds every candidate's block
errors and NLL, the choice, the runner-up margins, why NAEE was included or skipped, and the split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moeprune.criteria import CRITERIA
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.select.build import build_plan
from moeprune.select.plan import PrunePlan
from moeprune.select.protect import parse_protected, super_experts

if TYPE_CHECKING:
    from moeprune.pipeline.judge import WindowNLL

Drops = dict[int, list[int]]  # MoE layer -> dropped experts (original indices)
AUTO = "auto"
PER_LAYER = "auto:per_layer"


def calibrated_criteria() -> list[str]:
    return [name for name, crit in CRITERIA.items() if crit.needs == "calibration"]


# ---------------------------------------------------------------------------------------------- candidates
def criterion_candidates(stats, ratio: float, protect: list[str]) -> dict[str, PrunePlan]:
    """One uniform plan per calibrated criterion, all from the same statistics."""
    return {name: build_plan(stats, name, ratio, protect=protect) for name in calibrated_criteria()}


def protected_experts(protect: tuple[str, ...], protect_super: bool, stats) -> dict[int, set[int]]:
    """The user's --protect experts, plus (protect_super) the super experts of the scoring statistics."""
    protected = parse_protected(list(protect))
    if protect_super:
        combined = stats.combined()
        for layer, experts in super_experts({k: v.sums["max_abs"] for k, v in combined.items()}).items():
            protected.setdefault(layer, set()).update(experts)
            logger.info("layer %d: super experts %s are protected", layer, sorted(experts))
    return protected


# ---------------------------------------------------------------------------------------------- the choice
@dataclass
class Judgement:
    """Candidates and what the judge measured. Judge windows: each set's first half (`first_b`) gives block errors
    and the per-layer composition; NLL is measured on every judge window, and the composition is preferred to the
    best single candidate only when its NLL on the second half (text that did not choose it) is lower."""

    plans: dict[str, PrunePlan]
    drops: dict[str, Drops]
    first_b: dict[str, int]  # set -> index of its first second-half judge window
    compose: bool  # every set has >= 2 judge windows (else no per-layer composition)
    per_set: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # c -> layer -> set -> err
    judged: list[str] = field(default_factory=list)  # distinct candidates whose NLL was measured
    nll: dict[str, WindowNLL] = field(default_factory=dict)
    best_by_layer: dict[int, str] = field(default_factory=dict)
    composed: Drops = field(default_factory=dict)
    composite: bool = False  # the composition differs from every candidate (and is judged)

    @property
    def same_as(self) -> dict[str, str]:
        return _duplicates(self.drops)

    @property
    def distinct(self) -> dict[str, Drops]:
        same = self.same_as
        return {name: d for name, d in self.drops.items() if name not in same}

    def error(self, name: str) -> dict[int, float]:
        """err_c(ℓ): the mean over calibration sets of each set's relative block error."""
        per = self.per_set[name] if name != PER_LAYER else {
            layer: self.per_set[c][layer] for layer, c in self.best_by_layer.items()}
        return {layer: math.fsum(v.values()) / len(v) for layer, v in per.items()}

    @property
    def mean_error(self) -> dict[str, float]:
        out = {c: sum(e.values()) / len(e) for c in self.distinct for e in [self.error(c)]}
        if self.composite:
            e = self.error(PER_LAYER)
            out[PER_LAYER] = sum(e.values()) / len(e)
        return out

    def compose_layers(self, layers: list[int]) -> None:
        if not self.compose:
            return
        errors = {c: self.error(c) for c in self.distinct}
        self.best_by_layer = {layer: min(errors, key=lambda c, ell=layer: errors[c][ell]) for layer in layers}
        self.composed = {layer: self.distinct[c][layer] for layer, c in self.best_by_layer.items()}
        self.composite = all(self.composed != d for d in self.distinct.values())

    def section(self, naee: dict, scoring, judge) -> dict:
        """The report's "auto" object (also stored in the plan); its "chosen" is the choice."""
        base, base_sets = self.nll["original"].mean()
        nll = {c: self.nll[c].mean()[0] for c in self.nll}
        mean = self.mean_error
        ranking = sorted(self.judged, key=lambda c: (nll[c], mean[c]))
        best = ranking[0]
        chosen, per_layer = best, {"layers": {str(k): v for k, v in sorted(self.best_by_layer.items())}}
        if not self.compose:
            per_layer["reason"] = "not composed: a calibration set has a single judge window"
        elif not self.composite:
            per_layer["same_as"] = next(c for c, d in self.distinct.items() if d == self.composed)
        else:
            second = {c: self.nll[c].mean(self.first_b)[0] for c in (PER_LAYER, best)}
            per_layer["nll_second_half"] = second
            if second[PER_LAYER] < second[best]:
                chosen = PER_LAYER
        margins = [{"candidate": c, "nll": nll[c], "margin_nll": nll[c] - nll[best],
                    "margin_ratio": math.exp(nll[c] - nll[best])} for c in ranking]
        if chosen == PER_LAYER:  # judged against the best single on the second half only
            gap = per_layer["nll_second_half"][best] - per_layer["nll_second_half"][PER_LAYER]
            runner, margin = best, gap
        else:
            runner = ranking[1] if len(ranking) > 1 else None
            margin = nll[runner] - nll[best] if runner else None
        return {
            "chosen": chosen,
            "judged_by": "NLL of the masked model on the judge windows (mean over calibration sets of the per-token "
                         "NLL); the per-layer composition, chosen by block error on the first half of each set's "
                         "judge windows, against the best single candidate on the second half",
            "original_nll": base, "original_nll_per_set": base_sets,
            "judged_ratio": math.exp(nll[chosen] - base),
            "runner_up": runner, "margin_nll": margin, "margin_ratio": math.exp(margin) if runner else None,
            "ranking": margins,
            "candidates": self.candidates(nll, mean, base),
            "per_layer": per_layer,
            "naee": naee,
            "judge": {"nll_candidates": len(self.judged),
                      "windows": {s.name: int(s.input_ids.shape[0]) for s in judge},
                      "block_error_windows": self.first_b if self.compose else None,
                      "tokens": sum(s.tokens for s in judge),
                      "scoring_windows": {s.name: int(s.input_ids.shape[0]) for s in scoring},
                      "scoring_tokens": sum(s.tokens for s in scoring)},
        }

    def candidates(self, nll: dict[str, float], mean: dict[str, float], base: float) -> dict[str, dict]:
        same = self.same_as
        out = {}
        for name in [*self.plans, *([PER_LAYER] if self.composite else [])]:
            rep = same.get(name, name)
            entry = {"mean_block_error": mean[rep],
                     "block_error": {str(k): v for k, v in sorted(self.error(rep).items())},
                     "nll": nll.get(rep), "judged_ratio": math.exp(nll[rep] - base) if rep in nll else None}
            if rep in self.nll:
                entry["nll_per_set"] = self.nll[rep].mean()[1]
            if name in same:
                entry["same_as"] = rep
            else:
                dropped = self.composed if name == PER_LAYER else self.drops[name]
                entry["dropped"] = {str(k): list(v) for k, v in sorted(dropped.items())}
            out[name] = entry
        return out


def _duplicates(drops: dict[str, Drops]) -> dict[str, str]:
    """{candidate: the earlier candidate that drops the same experts in every layer}."""
    seen: dict[str, str] = {}
    out = {}
    for name, d in drops.items():
        key = repr(sorted((layer, sorted(v)) for layer, v in d.items()))
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def chosen_plan(chosen: str, plans: dict[str, PrunePlan], j: Judgement, adapter: MoEAdapter, ratio: float,
                protected: dict[int, set[int]], section: dict) -> PrunePlan:
    E = adapter.num_experts
    base = plans.get(chosen)
    dropped = j.composed if chosen == PER_LAYER else j.drops[chosen]
    kept = {layer: [e for e in range(E) if e not in set(d)] for layer, d in dropped.items()}
    note = None
    if chosen == PER_LAYER:
        note = "auto: each layer drops the set of the candidate with the lowest block error there: " + ", ".join(
            f"{layer}: {c}" for layer, c in sorted(j.best_by_layer.items()))
    plan = PrunePlan(kept, E, method=chosen, ratio=ratio, model_type=adapter.model_type,
                     scores=base.scores if base is not None else None,
                     policy=base.policy if base is not None else "uniform",
                     protected={k: sorted(v) for k, v in protected.items() if v} or None, note=note, auto=section)
    plan.validate(adapter)
    return plan


def describe_choice(section: dict) -> str:
    """One line: what auto chose, its judged perplexity ratio, and the runner-up's margin."""
    text = (f"auto chose {section['chosen']} (judge-window perplexity ×{section['judged_ratio']:.4f} of the "
            f"original's, {section['judge']['tokens']} held-apart calibration tokens)")
    if section.get("runner_up"):
        text += (f"; runner-up {section['runner_up']}: +{section['margin_nll']:.4f} nats/token "
                 f"(×{section['margin_ratio']:.4f} perplexity)")
    naee = "NAEE included" if section["naee"]["included"] else "NAEE skipped"
    return text + f"; {len(section['candidates'])} candidates, {len(section['ranking'])} judged by NLL, {naee}."

"""`method: auto`: choose the expert-removal method per model (or per layer, where that is better) from ONE
calibration run, judged by K-fold cross-fitting on the calibration windows (`pipeline/judge.py`).
This module holds the candidates and the choice; `pipeline/auto.py:plan_auto` runs the steps on the model.

    folds          = each set's windows cut into K contiguous folds                 (`judge.split_folds`)
    stats_f        = calibrate(model, fold-sets)   the one calibration pass; stats = Σ_k stats_k (every window)
    candidates     = {c: build_plan(stats, c, ratio)  for every calibrated criterion c}  (uniform policy; what a
                     single-criterion run on the same windows plans)  ∪ {naee_reconstruction} where affordable
    candidates_k   = the same, scored on Σ_{k' ≠ k} stats_k' (NAEE: its own pass without fold k)
    err_c(ℓ)       = mean over sets of Σ_k ‖Y − Ŷ_{c_k}‖² / Σ_k ‖Y‖² on fold k's windows (`judge.block_errors`)
    cross_c        = mean over sets of the per-token NLL of candidate c_k's masked model on fold k's windows, summed
                     over folds (`judge.judged_nll`): the procedure "criterion c on this much text", judged on text
                     it never saw
    in_c           = the same NLL of c's exported plan (scored on every window) on every window: the very plan that
                     ships, judged on text it was scored on
    nll_c          = ½ (cross_c + in_c), for every candidate (or the `nll_candidates` of lowest mean_ℓ err_c(ℓ))
    best           = argmin_c nll_c
    per_layer      = layer by layer, the criterion of lowest err_c(ℓ) on the first half of each set's folds (A)
    chosen         = per_layer  if its nll on the other folds (B) < best's nll on B  else best
Neither estimate alone ranks the exports well on the testbeds (benchmarks/RESULTS.md, "auto"): cross-fitting judges
plans that differ from the export where plans move with the sample (50 % of experts), in-sample NLL favours what
fits the calibration text; their mean was measured best. The export is the chosen criterion's plan on every window
(exactly what `--method <it>` plans), or the per-layer composition of those plans. The composition is chosen on A,
so only B (text that did not choose it) can say whether it beats the best single candidate.
Candidates that drop the same experts in every fold are judged once (`same_as`). The plan's `method` is the chosen
criterion ("naee_reconstruction", or "auto:per_layer"); `plan.auto` holds every candidate's block errors and NLL,
the choice, the runner-up margins, why NAEE was included or skipped, and the folds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moeprune.criteria import CRITERIA
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.select.build import build_plan
from moeprune.select.drops import Drops, PerSet
from moeprune.select.plan import PrunePlan
from moeprune.select.protect import parse_protected, super_experts

if TYPE_CHECKING:
    from moeprune.pipeline.judge import BlockErrors, WindowNLL

AUTO = "auto"
PER_LAYER = "auto:per_layer"
IN_SAMPLE = "@in_sample"  # suffix of the NLL streams of the exported plans (`Judgement.nll`)


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
    """Candidates and what the judge measured (module docstring). `where[f] = (set, k)` for every fold-set f;
    `fold_drops[c][f]` is what candidate c scored without fold k drops; `drops[c]` what c scored on every window
    drops (its export)."""

    drops: dict[str, Drops]
    fold_drops: dict[str, PerSet]
    where: dict[str, tuple[str, int]]
    plans: dict[str, PrunePlan] = field(default_factory=dict)
    errors: BlockErrors | None = None
    judged: list[str] = field(default_factory=list)  # distinct candidates whose NLL was measured
    nll: dict[str, WindowNLL] = field(default_factory=dict)  # c: cross-fitted; c + IN_SAMPLE: c's export
    best_by_layer: dict[int, str] = field(default_factory=dict)
    composed_folds: PerSet = field(default_factory=dict)  # per_layer's drops on every fold-set
    composite: bool = False  # the composition differs from every candidate (and is judged)
    errors_a: dict[str, dict[int, float]] = field(default_factory=dict)  # err_c(ℓ) on the A folds

    # ------------------------------------------------------------------ folds
    def groups(self, half: str | None = None) -> dict[str, list[str]]:
        """{set: its fold-sets}; half "A": each set's first ⌈K_s/2⌉ folds, "B": the others."""
        out: dict[str, list[str]] = {}
        for f, (s, _) in self.where.items():
            out.setdefault(s, []).append(f)
        if half is None:
            return out
        cut = {s: -(-len(fs) // 2) for s, fs in out.items()}
        return {s: [f for f in fs if (self.where[f][1] < cut[s]) == (half == "A")] for s, fs in out.items()}

    @property
    def same_as(self) -> dict[str, str]:
        return _duplicates({c: {(f, layer): d for f, per in fd.items() for layer, d in per.items()}
                            for c, fd in self.fold_drops.items()})

    @property
    def distinct(self) -> dict[str, PerSet]:
        same = self.same_as
        return {name: d for name, d in self.fold_drops.items() if name not in same}

    def error(self, name: str, half: str | None = None) -> dict[int, float]:
        """err_c(ℓ) over every fold (or one half); PER_LAYER: each layer's chosen candidate's."""
        groups = self.groups(half)
        if name != PER_LAYER:
            return self.errors.error(self.same_as.get(name, name), groups)
        per = {c: self.errors.error(c, groups) for c in set(self.best_by_layer.values())}
        return {layer: per[c][layer] for layer, c in self.best_by_layer.items()}

    @property
    def mean_error(self) -> dict[str, float]:
        names = [*self.distinct, *([PER_LAYER] if self.composite else [])]
        return {c: sum(e.values()) / len(e) for c in names for e in [self.error(c)]}

    def compose_layers(self, layers: list[int]) -> None:
        """Each layer's candidate of lowest block error on the A folds, and its drops on every fold-set."""
        errors = self.errors_a = {c: self.error(c, "A") for c in self.distinct}
        self.best_by_layer = {layer: min(errors, key=lambda c, ell=layer: errors[c][ell]) for layer in layers}
        self.composed_folds = {f: {layer: self.fold_drops[c][f][layer] for layer, c in self.best_by_layer.items()}
                               for f in self.where}
        self.composite = all(self.composed_folds != d for d in self.distinct.values())

    def judged_nll(self, c: str, groups: dict[str, list[str]]) -> float:
        """nll_c = ½ (cross_c + in_c) over `groups` (module docstring)."""
        return 0.5 * (self.nll[c].mean(groups)[0] + self.nll[c + IN_SAMPLE].mean(groups)[0])

    def streams(self, fold_sets: list[str]) -> dict[str, PerSet]:
        """What `judge.judged_nll` runs: the original, every judged candidate cross-fitted and as exported, and the
        composition (when composite) both ways."""
        out = {"original": {f: {} for f in fold_sets}}
        for c in [*self.judged, *([PER_LAYER] if self.composite else [])]:
            out[c] = self.composed_folds if c == PER_LAYER else self.distinct[c]
            final = self.composed() if c == PER_LAYER else self.drops[c]
            out[c + IN_SAMPLE] = {f: final for f in fold_sets}
        return out

    def composed(self) -> Drops | None:
        """The composition's drops on every window: each layer from its candidate's final plan (None while one of
        those plans is not made)."""
        if any(c not in self.drops for c in self.best_by_layer.values()):
            return None
        return {layer: self.drops[c][layer] for layer, c in self.best_by_layer.items()}

    # ------------------------------------------------------------------ report
    def section(self, naee: dict, folds: int, windows: dict[str, int], tokens: int) -> dict:
        """The report's "auto" object (also stored in the plan); its "chosen" is the choice."""
        groups = self.groups()
        base, base_sets = self.nll["original"].mean(groups)
        nll = {c: self.judged_nll(c, groups) for c in self.nll if c != "original" and not c.endswith(IN_SAMPLE)}
        mean = self.mean_error
        ranking = sorted(self.judged, key=lambda c: (nll[c], mean[c]))
        best = ranking[0]
        chosen, per_layer = best, {"layers": {str(k): v for k, v in sorted(self.best_by_layer.items())},
                                   "block_error_first_half": {c: {str(k): v for k, v in sorted(e.items())}
                                                              for c, e in self.errors_a.items()}}
        if not self.composite:
            per_layer["same_as"] = next(c for c, d in self.distinct.items() if d == self.composed_folds)
        else:
            second = {c: self.judged_nll(c, self.groups("B")) for c in (PER_LAYER, best)}
            per_layer["nll_second_half"] = second
            if second[PER_LAYER] < second[best]:
                chosen = PER_LAYER
        margins = [{"candidate": c, "nll": nll[c], "margin_nll": nll[c] - nll[best],
                    "margin_ratio": math.exp(nll[c] - nll[best])} for c in ranking]
        if chosen == PER_LAYER:  # judged against the best single on the B folds only
            gap = per_layer["nll_second_half"][best] - per_layer["nll_second_half"][PER_LAYER]
            runner, margin = best, gap
        else:
            runner = ranking[1] if len(ranking) > 1 else None
            margin = nll[runner] - nll[best] if runner else None
        return {
            "chosen": chosen,
            "judged_by": f"NLL of the masked model (mean over calibration sets of the per-token NLL), the mean of "
                         f"{folds}-fold cross-fitting (every candidate scored without a fold and judged on it) and "
                         "the exported plan's NLL on every window; the per-layer composition, chosen by block error "
                         "on the first half of each set's folds, against the best single candidate on the other half",
            "original_nll": base, "original_nll_per_set": base_sets,
            "judged_ratio": math.exp(nll[chosen] - base),
            "runner_up": runner, "margin_nll": margin, "margin_ratio": math.exp(margin) if runner else None,
            "ranking": margins,
            "candidates": self.candidates(nll, mean, base),
            "per_layer": per_layer,
            "naee": naee,
            "judge": {"nll_candidates": len(self.judged), "folds": folds, "windows": windows, "tokens": tokens,
                      "composition_folds": {h: {s: sorted(self.where[f][1] for f in fs) for s, fs in
                                                self.groups(h).items()} for h in ("A", "B")}},
        }

    def candidates(self, nll: dict[str, float], mean: dict[str, float], base: float) -> dict[str, dict]:
        same = self.same_as
        out = {}
        for name in [*self.fold_drops, *([PER_LAYER] if self.composite else [])]:
            rep = same.get(name, name)
            entry = {"mean_block_error": mean[rep],
                     "block_error": {str(k): v for k, v in sorted(self.error(rep).items())},
                     "nll": nll.get(rep), "judged_ratio": math.exp(nll[rep] - base) if rep in nll else None}
            if rep in self.nll:
                entry["nll_cross_fitted"] = self.nll[rep].mean(self.groups())[0]
                entry["nll_in_sample"] = self.nll[rep + IN_SAMPLE].mean(self.groups())[0]
                entry["nll_per_set"] = {s: 0.5 * (a + self.nll[rep + IN_SAMPLE].mean(self.groups())[1][s])
                                        for s, a in self.nll[rep].mean(self.groups())[1].items()}
            if name in same:
                entry["same_as"] = rep
            dropped = self.composed() if name == PER_LAYER else self.drops.get(name)
            if dropped is not None:
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


def chosen_plan(chosen: str, j: Judgement, adapter: MoEAdapter, ratio: float, protected: dict[int, set[int]],
                section: dict) -> PrunePlan:
    E = adapter.num_experts
    base = j.plans.get(chosen)
    dropped = j.composed() if chosen == PER_LAYER else j.drops[chosen]
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
    text = (f"auto chose {section['chosen']} (judged perplexity ×{section['judged_ratio']:.4f} of the "
            f"original's, {section['judge']['folds']} folds, {section['judge']['tokens']} calibration tokens)")
    if section.get("runner_up"):
        text += (f"; runner-up {section['runner_up']}: +{section['margin_nll']:.4f} nats/token "
                 f"(×{section['margin_ratio']:.4f} perplexity)")
    naee = "NAEE included" if section["naee"]["included"] else "NAEE skipped"
    return text + f"; {len(section['candidates'])} candidates, {len(section['ranking'])} judged by NLL, {naee}."

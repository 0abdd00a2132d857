"""`method: auto`: choose the expert-removal method per model (or per layer, where that is better) from ONE
calibration run, judged on calibration windows held apart from the windows that score the candidates.

    scoring, judge = split_judge(sets, judge_windows)                      (`select/judge.py`)
    stats          = calibrate(model, scoring)                             the one calibration pass
    candidates     = {c: build_plan(stats, c, ratio)  for every calibrated criterion c}   (uniform policy)
                     ∪ {naee_reconstruction}  where affordable (`naee_decision`: its own progressive pass)
    err_c(ℓ)       = ‖Y − Ŷ_c‖² / ‖Y‖²  per MoE layer on the judge tokens (`judge.block_errors`)
    per_layer      = layer by layer, the dropped set of argmin_c err_c(ℓ)   (one more candidate when it differs)
    judged         = the `judge_top` candidates of lowest mean_ℓ err_c(ℓ)  ∪  {per_layer}
    chosen         = argmin_{c ∈ judged} nll_c   (masked model's NLL on the judge windows, `judge.judged_nll`)
Candidates that drop the same experts everywhere are judged once (`same_as`). The plan's `method` is the chosen
criterion ("naee_reconstruction", or "auto:per_layer"); `plan.auto` holds every candidate's block errors and NLL,
the choice, the runner-up margins, why NAEE was included or skipped, and the split.

NAEE is affordable (`auto_naee` None) when its search's estimated router-row evaluations stay within
`NAEE_BUDGET`: Σ_ℓ evaluations × tokens kept, evaluations = Π_g C(E/g, n_drop/g) when that is ≤ the exhaustive limit,
else (beam + 1)·n_drop·E (`select/reconstruction.py`); ≈ 0.4–2 µs each on one CPU thread (E = 16 … 128), so the
budget is ≈ 1.5–7 min of search. `auto_naee: true` always includes it, `false` never.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from moeprune.criteria import CRITERIA
from moeprune.errors import MoePruneError, UnsupportedLayout
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.select.build import build_plan
from moeprune.select.judge import Drops, block_errors, judged_nll, split_judge
from moeprune.select.naee_outputs import DEFAULT_SEARCH_TOKENS
from moeprune.select.plan import PrunePlan
from moeprune.select.progressive import reconstruction_decider
from moeprune.select.protect import parse_protected, super_experts
from moeprune.select.reconstruction import DEFAULT_BEAM
from moeprune.select.uniform import drop_count

AUTO = "auto"
PER_LAYER = "auto:per_layer"
NAEE_NAME = "naee_reconstruction"
DEFAULT_JUDGE_TOP = 4  # candidates (by lowest mean block error) whose masked model's NLL is measured
NAEE_BUDGET = 2 * 10**8  # router-row evaluations of NAEE's search (module docstring)
MAX_EXHAUSTIVE = 5000  # `progressive.reconstruction_decider`'s exhaustive limit


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


def naee_decision(choice: bool | None, adapter: MoEAdapter, ratio: float, tokens: int, beam: int | None,
                  search_tokens: int | None) -> dict:
    """{"included": bool, "reason": str, "evaluations_per_layer", "tokens", "cost", "budget"} (module docstring)."""
    from moeprune.models.capabilities import require

    routing, E = adapter.routing(), adapter.num_experts
    n_drop = drop_count(ratio, E, routing)
    groups = routing.n_group if routing.group_limited else 1
    subsets = math.comb(E // groups, n_drop // groups) ** groups
    b = DEFAULT_BEAM if beam is None else beam
    evaluations = subsets if subsets <= MAX_EXHAUSTIVE else (b + 1) * n_drop * E
    cap = DEFAULT_SEARCH_TOKENS if search_tokens is None else search_tokens
    kept = tokens if cap == 0 else min(tokens, cap)
    cost = evaluations * kept * len(adapter.moe_layers())
    out = {"evaluations_per_layer": evaluations, "exhaustive": subsets <= MAX_EXHAUSTIVE, "tokens": kept,
           "cost": cost, "budget": NAEE_BUDGET}
    if choice is False:
        return {"included": False, "reason": "auto_naee: false", **out}
    try:
        require(adapter, "naee")
    except UnsupportedLayout as e:
        if choice:
            raise
        return {"included": False, "reason": str(e), **out}
    if choice is None and cost > NAEE_BUDGET:
        return {"included": False, "reason": f"not affordable: its search needs ≈{cost:.2g} router-row evaluations "
                f"({evaluations} sets × {kept} tokens × {len(adapter.moe_layers())} layers) > budget "
                f"{NAEE_BUDGET:.0e}; auto_naee: true includes it anyway", **out}
    return {"included": True, "reason": "auto_naee: true" if choice else f"affordable (≈{cost:.2g} router-row "
            f"evaluations ≤ {NAEE_BUDGET:.0e})", **out}


def naee_plan(ctx, scoring, adapter: MoEAdapter, ratio: float, protected: dict[int, set[int]], beam: int | None,
              search_tokens: int | None) -> PrunePlan:
    """NAEE's progressive search over the scoring windows (its own calibration pass; its statistics are not kept)."""
    extra = {} if beam is None else {"beam": beam}
    if search_tokens is not None:
        extra["max_tokens"] = search_tokens or None
    E = adapter.num_experts
    decide = reconstruction_decider(ratio, adapter.routing(), E, protected, **extra)
    stats = dataclasses.replace(ctx, sets=scoring, stats=[]).routed_stats(decide=decide)
    dropped = {int(k): set(v) for k, v in stats.meta["dropped_as_you_go"].items()}
    kept = {layer: [j for j in range(E) if j not in dropped.get(layer, set())] for layer in adapter.moe_layers()}
    return PrunePlan(kept, E, method=NAEE_NAME, ratio=ratio, model_type=adapter.model_type, policy="reconstruction")


# ---------------------------------------------------------------------------------------------- the stage's plan
def plan_auto(o, ctx) -> PrunePlan:
    """`ExpertStage.plan` for method auto (`o`: its `ExpertOptions`, `ctx`: a `pipeline.context.StageContext`)."""
    from moeprune.calibration.distributed import current_rank

    if ctx.ckpt is None or ctx.calib is None or not ctx.sets:
        raise MoePruneError("method auto calibrates and judges candidates on the model: use `moeprune prune MODEL "
                            "--method auto --ratio R --calib NAME=PATH` (it cannot plan from a statistics file).")
    if current_rank().world > 1:
        raise MoePruneError("method auto judges its candidates in one process; run it without torchrun.")
    adapter, t0 = ctx.adapter, time.perf_counter()
    seconds = {}
    scoring, judge = split_judge(ctx.sets, o.judge_windows)
    stats = dataclasses.replace(ctx, sets=scoring).routed_stats()  # appends to ctx.stats: saved with the export
    seconds["calibration"] = time.perf_counter() - t0
    protected = protected_experts(o.protect, o.protect_super, stats)
    protect = [f"{layer}:{','.join(map(str, sorted(v)))}" for layer, v in sorted(protected.items()) if v]
    plans = criterion_candidates(stats, o.ratio, protect)
    tokens = sum(s.tokens for s in scoring)
    naee = naee_decision(o.auto_naee, adapter, o.ratio, tokens, o.beam, o.search_tokens)
    if naee["included"]:
        t = time.perf_counter()
        plans[NAEE_NAME] = naee_plan(ctx, scoring, adapter, o.ratio, protected, o.beam, o.search_tokens)
        seconds["naee"] = time.perf_counter() - t
    else:
        logger.info("auto: NAEE not a candidate (%s)", naee["reason"])
    drops = {name: {layer: p.dropped(layer) for layer in p.layers} for name, p in plans.items()}
    same_as = _duplicates(drops)
    unique = {name: d for name, d in drops.items() if name not in same_as}
    top = o.judge_top or DEFAULT_JUDGE_TOP
    bs, device = ctx.calib.batch_size, ctx.calib.device
    with judge_model(ctx) as (model, layer_context):
        t = time.perf_counter()
        per_set = block_errors(model, adapter, judge, unique, batch_size=bs, device=device,
                               layer_context=layer_context)
        errors = {c: {layer: math.fsum(v.values()) / len(v) for layer, v in e.items()} for c, e in per_set.items()}
        seconds["block_errors"] = time.perf_counter() - t
        best_by_layer = {layer: min(unique, key=lambda c, ell=layer: errors[c][ell]) for layer in adapter.moe_layers()}
        composed = {layer: unique[c][layer] for layer, c in best_by_layer.items()}
        composite_is = next((c for c, d in unique.items() if d == composed), None)
        if composite_is is None:
            unique[PER_LAYER] = composed
            errors[PER_LAYER] = {layer: errors[c][layer] for layer, c in best_by_layer.items()}
            per_set[PER_LAYER] = {layer: per_set[c][layer] for layer, c in best_by_layer.items()}
        mean = {c: sum(e.values()) / len(e) for c, e in errors.items()}
        judged = sorted((c for c in unique if c != PER_LAYER), key=mean.get)[:top]
        if composite_is is None:
            judged.append(PER_LAYER)
        t = time.perf_counter()
        nll = judged_nll(model, adapter, judge, {"original": {}, **{c: unique[c] for c in judged}}, batch_size=bs,
                         device=device, layer_context=layer_context)
        seconds["nll"] = time.perf_counter() - t
    chosen = min(judged, key=lambda c: (nll[c]["nll"], mean[c]))
    section = auto_section(chosen, plans, drops, same_as, errors, per_set, mean, nll, judged, best_by_layer,
                           composite_is, naee, scoring, judge, top)
    seconds["total"] = time.perf_counter() - t0
    section["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    plan = chosen_plan(chosen, plans, unique, adapter, o.ratio, protected, section)
    logger.info("%s", describe_choice(section))
    return plan


@contextmanager
def judge_model(ctx) -> Iterator[tuple]:
    """(model, layer_context) as the earlier stages leave it: whole in memory, or lazily one layer at a time."""
    if ctx.lazy:
        lazy, layer_context = ctx.lazy_model(dtype=ctx.calib.dtype, head=True)
        yield lazy.model, layer_context
        del lazy
    else:
        model = ctx.model(dtype=ctx.calib.dtype)
        yield model, None
        del model


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


def chosen_plan(chosen: str, plans: dict[str, PrunePlan], unique: dict[str, Drops], adapter: MoEAdapter,
                ratio: float, protected: dict[int, set[int]], section: dict) -> PrunePlan:
    E = adapter.num_experts
    base = plans.get(chosen)
    kept = {layer: [j for j in range(E) if j not in set(d)] for layer, d in unique[chosen].items()}
    note = None
    if chosen == PER_LAYER:
        note = "auto: each layer drops the set of the candidate with the lowest block error there: " + ", ".join(
            f"{layer}: {c}" for layer, c in sorted(section["per_layer"]["layers"].items(), key=lambda x: int(x[0])))
    plan = PrunePlan(kept, E, method=chosen, ratio=ratio, model_type=adapter.model_type,
                     scores=base.scores if base is not None else None,
                     policy=base.policy if base is not None else "uniform",
                     protected={k: sorted(v) for k, v in protected.items() if v} or None, note=note, auto=section)
    plan.validate(adapter)
    return plan


def auto_section(chosen, plans, drops, same_as, errors, per_set, mean, nll, judged, best_by_layer, composite_is, naee,
                 scoring, judge, top) -> dict:
    """The report's "auto" object (also stored in the plan)."""
    base = nll["original"]["nll"]
    candidates = {}
    for name in [*plans, *([PER_LAYER] if PER_LAYER in errors else [])]:
        rep = same_as.get(name, name)
        entry = {"mean_block_error": mean[rep], "block_error": {str(k): v for k, v in sorted(errors[rep].items())},
                 "block_error_per_set": {str(k): v for k, v in sorted(per_set[rep].items())},
                 "nll": nll[rep]["nll"] if rep in nll else None,
                 "judged_ratio": math.exp(nll[rep]["nll"] - base) if rep in nll else None}
        if rep in nll:
            entry["nll_per_set"] = nll[rep]["sets"]
        if name in same_as:
            entry["same_as"] = rep
        else:
            dropped = drops_of_per_layer(best_by_layer, drops) if name == PER_LAYER else drops[name]
            entry["dropped"] = {str(k): list(v) for k, v in sorted(dropped.items())}
        candidates[name] = entry
    ranking = sorted(judged, key=lambda c: (nll[c]["nll"], mean[c]))
    best = nll[chosen]["nll"]
    margins = [{"candidate": c, "nll": nll[c]["nll"], "margin_nll": nll[c]["nll"] - best,
                "margin_ratio": math.exp(nll[c]["nll"] - best)} for c in ranking]
    runner = margins[1] if len(margins) > 1 else None
    return {
        "chosen": chosen,
        "judged_by": "NLL of the masked model on the judge windows (mean over calibration sets of the per-token "
                     "NLL); NLL measured for the candidates of lowest mean block error and the per-layer composition",
        "original_nll": base,
        "original_nll_per_set": nll["original"]["sets"],
        "judged_ratio": math.exp(best - base),
        "runner_up": runner["candidate"] if runner else None,
        "margin_nll": runner["margin_nll"] if runner else None,
        "margin_ratio": runner["margin_ratio"] if runner else None,
        "ranking": margins,
        "candidates": candidates,
        "per_layer": {"layers": {str(k): v for k, v in sorted(best_by_layer.items())},
                      "same_as": composite_is},
        "naee": naee,
        "judge": {"judge_top": top,
                  "windows": {s.name: int(s.input_ids.shape[0]) for s in judge},
                  "tokens": sum(s.tokens for s in judge),
                  "scoring_windows": {s.name: int(s.input_ids.shape[0]) for s in scoring},
                  "scoring_tokens": sum(s.tokens for s in scoring)},
    }


def drops_of_per_layer(best_by_layer: dict[int, str], drops: dict[str, Drops]) -> Drops:
    return {layer: drops[c][layer] for layer, c in best_by_layer.items()}


def describe_choice(section: dict) -> str:
    """One line: what auto chose, its judged perplexity ratio, and the runner-up's margin."""
    chosen = section["chosen"]
    text = (f"auto chose {chosen} (judge-window perplexity ×{section['judged_ratio']:.4f} of the original's, "
            f"{section['judge']['tokens']} held-apart calibration tokens)")
    if section.get("runner_up"):
        text += (f"; runner-up {section['runner_up']} ×{section['margin_ratio']:.4f} of that "
                 f"(+{section['margin_nll']:.4f} nats/token)")
    n = len(section["candidates"])
    naee = "NAEE included" if section["naee"]["included"] else "NAEE skipped"
    return text + f"; {n} candidates, {len(section['ranking'])} judged by NLL, {naee}."

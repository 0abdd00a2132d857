"""`method: auto` on the model: the steps of `select/auto.py`'s formulas, run with the stage's context (the model as
earlier stages leave it, whole or lazily one layer at a time, and the calibration sets). `ExpertStage.plan` calls
`plan_auto` for method auto.
"""

from __future__ import annotations

import dataclasses
import time

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.pipeline.judge import (
    JUDGE_FOLDS,
    block_errors,
    judge_model,
    judged_nll,
    split_folds,
    without_fold,
)
from moeprune.select.auto import (
    Judgement,
    chosen_plan,
    criterion_candidates,
    describe_choice,
    protected_experts,
)
from moeprune.select.auto_naee import NAEE_NAME, naee_decision, naee_plan
from moeprune.select.plan import PrunePlan
from moeprune.stats.store import ExpertStats


def plan_auto(o, ctx) -> PrunePlan:
    """`ExpertStage.plan` for method auto (`o`: its `ExpertOptions`, `ctx`: a `pipeline.context.StageContext`)."""
    from moeprune.calibration.distributed import current_rank

    if ctx.ckpt is None or ctx.calib is None or not ctx.sets:
        raise MoePruneError("method auto calibrates the model and judges its candidates on it, which `moeprune "
                            "plan` does not run: use `moeprune prune MODEL --method auto --ratio R --calib "
                            "NAME=PATH`.")
    if current_rank().world > 1:
        raise MoePruneError("method auto judges its candidates in one process; run it without torchrun.")
    adapter, t0, seconds = ctx.adapter, time.perf_counter(), {}
    K = o.judge_folds or JUDGE_FOLDS
    fold_sets, where = split_folds(ctx.sets, K)
    folds = sorted({k for _, k in where.values()})
    per_fold = dataclasses.replace(ctx, sets=fold_sets, stats=[]).routed_stats()  # the one calibration pass
    stats = merge_folds(per_fold, ctx.sets, where)
    ctx.stats.append(stats)  # saved with the export: the statistics of every window, per calibration set
    seconds["calibration"] = time.perf_counter() - t0

    def candidates(st: ExpertStats):
        protected = protected_experts(o.protect, o.protect_super, st)
        protect = [f"{layer}:{','.join(map(str, sorted(v)))}" for layer, v in sorted(protected.items()) if v]
        return criterion_candidates(st, o.ratio, protect), protected

    plans, protected = candidates(stats)
    by_fold = {k: candidates(merge_folds(per_fold, ctx.sets, where, without=k))[0] for k in folds}
    tokens = sum(s.tokens for s in ctx.sets)
    naee = naee_decision(o.auto_naee, adapter, o.ratio, tokens, o.beam, o.search_tokens, passes=len(folds) + 1)
    if naee["included"]:
        t = time.perf_counter()
        for k in folds:
            by_fold[k][NAEE_NAME] = naee_plan(ctx, without_fold(ctx.sets, K, k), adapter, o.ratio, protected,
                                              o.beam, o.search_tokens)
        plans[NAEE_NAME] = naee_plan(ctx, ctx.sets, adapter, o.ratio, protected, o.beam, o.search_tokens)
        seconds["naee"] = time.perf_counter() - t
    else:
        logger.info("auto: NAEE not a candidate (%s)", naee["reason"])
    j = Judgement(drops={c: {layer: p.dropped(layer) for layer in p.layers} for c, p in plans.items()},
                  fold_drops={c: {f: {layer: by_fold[k][c].dropped(layer) for layer in by_fold[k][c].layers}
                                  for f, (_, k) in where.items()} for c in plans},
                  where=where, plans=dict(plans))
    bs, device = ctx.calib.batch_size, ctx.calib.device
    with judge_model(ctx) as (model, layer_context):
        t = time.perf_counter()
        j.errors = block_errors(model, adapter, fold_sets, j.distinct, batch_size=bs, device=device,
                                layer_context=layer_context)
        seconds["block_errors"] = time.perf_counter() - t
        j.compose_layers(adapter.moe_layers())
        j.judged = sorted(j.distinct, key=j.mean_error.get)[: o.nll_candidates]  # None: every candidate
        t = time.perf_counter()
        j.nll = judged_nll(model, adapter, fold_sets, j.streams([f.name for f in fold_sets]), batch_size=bs,
                           device=device, layer_context=layer_context)
        seconds["nll"] = time.perf_counter() - t
    windows = {s.name: int(s.input_ids.shape[0]) for s in ctx.sets}
    section = j.section(naee, K, windows, tokens)
    seconds["total"] = time.perf_counter() - t0
    section["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    plan = chosen_plan(section["chosen"], j, adapter, o.ratio, protected, section)
    logger.info("%s", describe_choice(section))
    return plan


def merge_folds(stats: ExpertStats, sets, where: dict[str, tuple[str, int]], without: int | None = None) -> ExpertStats:
    """Per calibration set, the sum of its fold-sets' statistics (fold `without` left out): the statistics a
    calibration run on those windows gives (sums add, maxima take the max)."""
    merged = {}
    for s in sets:
        members = [f for f, (name, k) in where.items() if name == s.name and k != without]
        combined = stats.combined(members)
        merged[s.name] = combined
    calibration = {s.name: [s.describe()] for s in sets}
    return ExpertStats(stats.model_type, stats.num_experts, stats.top_k, list(stats.layers), stats.router_sha256,
                       merged, {**stats.meta, "calibration": calibration})

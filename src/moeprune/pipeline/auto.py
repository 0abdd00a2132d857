"""`method: auto` on the model: the steps of `select/auto.py`'s formulas, run with the stage's context (the model as
earlier stages leave it, whole or lazily one layer at a time, and the calibration sets). `ExpertStage.plan` calls
`plan_auto` for method auto.
"""

from __future__ import annotations

import dataclasses
import time

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.pipeline.judge import block_errors, judge_model, judged_nll, split_judge
from moeprune.select.auto import (
    PER_LAYER,
    Judgement,
    chosen_plan,
    criterion_candidates,
    describe_choice,
    protected_experts,
)
from moeprune.select.auto_naee import NAEE_NAME, naee_decision, naee_plan
from moeprune.select.plan import PrunePlan


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
    scoring, judge = split_judge(ctx.sets, o.judge_windows)
    stats = dataclasses.replace(ctx, sets=scoring).routed_stats()  # appends to ctx.stats: saved with the export
    seconds["calibration"] = time.perf_counter() - t0
    protected = protected_experts(o.protect, o.protect_super, stats)
    protect = [f"{layer}:{','.join(map(str, sorted(v)))}" for layer, v in sorted(protected.items()) if v]
    plans = criterion_candidates(stats, o.ratio, protect)
    naee = naee_decision(o.auto_naee, adapter, o.ratio, sum(s.tokens for s in scoring), o.beam, o.search_tokens)
    if naee["included"]:
        t = time.perf_counter()
        plans[NAEE_NAME] = naee_plan(ctx, scoring, adapter, o.ratio, protected, o.beam, o.search_tokens)
        seconds["naee"] = time.perf_counter() - t
    else:
        logger.info("auto: NAEE not a candidate (%s)", naee["reason"])
    j = Judgement(plans, {name: {layer: p.dropped(layer) for layer in p.layers} for name, p in plans.items()},
                  first_b={s.name: (int(s.input_ids.shape[0]) + 1) // 2 for s in judge},
                  compose=all(s.input_ids.shape[0] >= 2 for s in judge))
    bs, device = ctx.calib.batch_size, ctx.calib.device
    with judge_model(ctx) as (model, layer_context):
        t = time.perf_counter()
        first_half = [_head(s, j.first_b[s.name]) for s in judge] if j.compose else judge
        j.per_set = block_errors(model, adapter, first_half, j.distinct, batch_size=bs, device=device,
                                 layer_context=layer_context)
        seconds["block_errors"] = time.perf_counter() - t
        j.compose_layers(adapter.moe_layers())
        j.judged = sorted(j.distinct, key=j.mean_error.get)[: o.nll_candidates]  # None: every candidate
        t = time.perf_counter()
        measured = {"original": {}, **{c: j.distinct[c] for c in j.judged}}
        if j.composite:
            measured[PER_LAYER] = j.composed
        j.nll = judged_nll(model, adapter, judge, measured, batch_size=bs, device=device, layer_context=layer_context)
        seconds["nll"] = time.perf_counter() - t
    section = j.section(naee, scoring, judge)
    seconds["total"] = time.perf_counter() - t0
    section["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    plan = chosen_plan(section["chosen"], plans, j, adapter, o.ratio, protected, section)
    logger.info("%s", describe_choice(section))
    return plan


def _head(s, n: int):
    """The first n windows of a calibration set (the judge's first half: block errors, the per-layer choice)."""
    return dataclasses.replace(s, input_ids=s.input_ids[:n], attention_mask=s.attention_mask[:n])  # [n, L]

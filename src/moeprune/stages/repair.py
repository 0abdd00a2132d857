"""Closed-form repair as a stage: `{method: repair, kind: obs|compensate|router|all}` (`prune --repair KIND`).

It repairs the stage right before it: the teacher is the model before that stage, the student the model after it,
both run layer by layer on the calibration text (`repair/run.py`); the new values are a `WeightsPlan`. In memory
both models are held whole (two copies); with `--lazy` (or a model that does not fit) both are loaded lazily and
one decoder layer of each is materialised at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from moeprune.errors import MoePruneError
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.repair.run import KINDS, fixes_for, repair_model
from moeprune.stages.base import apply_chain, register_stage
from moeprune.stages.weights import StoredDtypes, WeightOptions, WeightStage
from moeprune.stages.weights_plan import WeightsPlan, weights_format
from moeprune.stages.weights_store import SpilledLayers

REPAIRABLE = ("experts", "merge", "neurons")


@dataclass(frozen=True)
class RepairOptions(WeightOptions):
    repair_kind: str = "all"  # obs | compensate | router | all ("kind" in a recipe, `--repair KIND` on prune)
    damp: float = 0.01  # λ = damp · mean(diag G) in every least-squares solve


class RepairStage(WeightStage):
    kind = "repair"
    plan_format = weights_format("repair")
    options_type = RepairOptions
    kind_option: ClassVar[str] = "repair_kind"

    @classmethod
    def methods(cls) -> list[str]:
        return ["repair"]

    def validate_options(self, o: RepairOptions) -> None:
        if o.repair_kind not in KINDS:
            raise MoePruneError(f"repair kind {o.repair_kind!r}: choose one of {', '.join(KINDS)}.")
        if isinstance(o.damp, bool) or not isinstance(o.damp, (int, float)) or not 0 <= o.damp < 10:
            raise MoePruneError(f"damp {o.damp!r}: a number >= 0 (relative damping, e.g. 0.01).")

    def check(self, o: RepairOptions, adapter: MoEAdapter) -> Any:
        from moeprune.models.capabilities import require

        require(adapter, "repair")
        return super().check(o, adapter)

    def check_previous(self, o: RepairOptions, previous: list) -> None:
        if not previous or previous[-1].stage.kind not in REPAIRABLE:
            what = "nothing" if not previous else f"{previous[-1].where}, a {previous[-1].stage.kind} stage"
            raise MoePruneError(f"repair fixes the cut of the stage right before it ({', '.join(REPAIRABLE)}); here "
                                f"it follows {what}. Put it after an expert, merge or neuron stage.")
        before = previous[-1].stage.kind
        if o.repair_kind == "obs" and before != "neurons":
            raise MoePruneError(f"kind obs repairs neuron removal, but it follows {previous[-1].where}, a {before} "
                                "stage; use kind compensate (or all).")
        if o.repair_kind == "router" and before == "neurons":
            raise MoePruneError("kind router re-fits the router after expert removal or merging; after neuron "
                                "removal the routing is unchanged — use kind obs or compensate (or all).")

    def plan(self, o: RepairOptions, ctx) -> WeightsPlan:
        from moeprune.stages.reference import Reference

        if ctx.ckpt is None or ctx.calib is None or ctx.sets is None:
            raise MoePruneError("repair runs the model before and after the cut on calibration text: use `moeprune "
                                "prune MODEL --calib NAME=PATH` with the recipe.")
        calib = ctx.calib
        last_stage, last_plan = ctx.previous[-1]
        contexts = {}
        if ctx.lazy:  # one decoder layer of each model in memory at a time
            lazy_s, contexts["student_context"] = ctx.lazy_model(dtype=calib.dtype)
            lazy_t, contexts["teacher_context"] = replace(ctx, previous=ctx.previous[:-1]).lazy_model(dtype=calib.dtype)
            student, teacher = lazy_s.model, lazy_t.model
        else:
            student = ctx.model(dtype=calib.dtype)
            teacher = apply_chain(load_model(ctx.ckpt.path, dtype=calib.dtype, device=calib.device),
                                  ctx.previous[:-1])
        t_adapter, s_adapter = get_adapter(teacher.config, model=teacher), get_adapter(student.config, model=student)
        ref = Reference.of_chain(teacher, t_adapter, [(last_stage, last_plan)], layers=[])  # bookkeeping only
        kinds = fixes_for(o.repair_kind, last_stage.kind)
        stored = StoredDtypes(ctx.ckpt, s_adapter)  # new values in the checkpoint's dtypes
        result = repair_model(teacher, student, t_adapter, s_adapter, ctx.sets, kinds, slots=ref.slots,
                              positions=ref.positions, previous_kind=last_stage.kind, damp=o.damp,
                              batch_size=calib.batch_size, device=calib.device, **contexts,
                              experts_out=SpilledLayers(cast=stored.experts) if ctx.lazy else None)
        layers = result.summary["layers"]
        before = sum(v["error_before"] for v in layers.values())
        after = sum(v["error_after"] for v in layers.values())
        result.summary |= {"error_before": before, "error_after": after,
                           "ratio": after / before if before > 0 else 1.0, "repairs": last_stage.describe(last_plan)}
        experts = result.experts if ctx.lazy else {i: stored.experts(i, ex) for i, ex in result.experts.items()}
        router = {i: stored.router(i, names) for i, names in result.router.items()}
        return WeightsPlan("repair", s_adapter.num_experts, s_adapter.expert_width, experts, router,
                           settings={"kind": o.repair_kind, "fixes": kinds, "damp": o.damp},
                           summary=result.summary, model_type=s_adapter.model_type)

    def describe(self, plan: WeightsPlan) -> str:
        s = plan.summary
        ratio = f", calibration block error ×{s['ratio']:.3f}" if "ratio" in s else ""
        return f"repair ({'+'.join(plan.settings.get('fixes', []))}){ratio}"


REPAIR = register_stage(RepairStage())

"""Expert merging as a stage (M-SMoE, HC-SMoE, Sub-MoE, DERN): groups from calibration statistics (`MergePlan`).

    groups[ℓ] = grouping(statistics with probes)                 n = E − drop groups per MoE layer (`merge/`)
    merged g  = merge(experts of group g, usage weights)         average | svd | dern (`merge/methods.py`)
Surgery keeps the dominants' slots and writes the merged weights there (`surgery/merge.py`); the reference keeps
every slot of the original, writes each group's merged expert into its dominant's slot and masks the members
in the original's own router (`stages/reference.py`), so slicing and renumbering are checked independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moeprune.errors import MoePruneError
from moeprune.merge.build import BUDGETS, make_merge_plan
from moeprune.merge.grouping import GROUPINGS
from moeprune.merge.methods import MERGES
from moeprune.merge.plan import MERGE_FORMAT, ROUTER_STRATEGIES, MergePlan
from moeprune.models.base import MoEAdapter
from moeprune.select.uniform import drop_count
from moeprune.stages.base import Need, Stage, StageOptions, config_copy, register_stage

MERGE_PLAN_NAME = "moeprune_merge.json"


@dataclass(frozen=True)
class MergeOptions(StageOptions):
    budget: str = "uniform"
    merge: str | None = None
    router: str = "dominant"
    rank: int | None = None
    threshold: float | None = None
    calib_set: tuple[str, ...] | None = None

    lists: ClassVar[tuple[str, ...]] = ("calib_set",)


class MergeStage(Stage):
    kind = "merge"
    plan_format = MERGE_FORMAT
    legacy_plan_name = MERGE_PLAN_NAME
    options_type = MergeOptions

    @classmethod
    def methods(cls) -> list[str]:
        return list(GROUPINGS)

    def merge_of(self, o: MergeOptions) -> str:
        return o.merge or GROUPINGS.get(o.method).merge

    # ------------------------------------------------------------------ options
    def validate_options(self, o: MergeOptions) -> None:
        GROUPINGS.get(o.method)
        merge = self.merge_of(o)
        MERGES.get(merge)
        ROUTER_STRATEGIES.get(o.router)
        if o.budget not in BUDGETS:
            raise MoePruneError(f"--budget {o.budget!r}: merges take one of {', '.join(BUDGETS)}.")
        if o.rank is not None and merge != "svd":
            raise MoePruneError(f"--rank applies to the svd merge; method {o.method} merges with {merge!r}. Drop "
                                "--rank or add --merge svd.")
        if o.rank is not None and (isinstance(o.rank, bool) or not isinstance(o.rank, int) or o.rank < 1):
            raise MoePruneError(f"--rank {o.rank!r} must be a positive integer.")
        if o.threshold is not None and merge != "dern":
            raise MoePruneError(f"--threshold applies to the dern merge; method {o.method} merges with {merge!r}. "
                                "Drop --threshold or add --merge dern.")
        if o.threshold is not None and not -1.0 <= float(o.threshold) <= 1.0:
            raise MoePruneError(f"--threshold {o.threshold} is a cosine: give a number in [-1, 1].")

    def needs(self, o: MergeOptions) -> set[Need]:
        return {Need.ROUTED, Need.PROBES}

    def check(self, o: MergeOptions, adapter: MoEAdapter) -> Any:
        if not adapter.gated_experts:
            from moeprune.errors import UnsupportedLayout

            raise UnsupportedLayout(f"{adapter.model_type}'s experts are up-only (y = down·act(up·x), no gate "
                                    "projection); expert merging aligns and averages gate, up and down and does not "
                                    "support up-only experts yet.")
        n_drop = drop_count(o.ratio, adapter.num_experts, adapter.routing())
        cfg = config_copy(adapter)
        adapter.set_config_experts(cfg, adapter.num_experts - n_drop)
        return cfg

    # ------------------------------------------------------------------ plans
    def plan(self, o: MergeOptions, ctx) -> MergePlan:
        stats = ctx.routed_stats()
        return make_merge_plan(stats, o.method, o.ratio, calib_set=list(o.calib_set) if o.calib_set else None,
                               budget=o.budget, merge=o.merge, router=o.router, rank=o.rank,
                               threshold=0.4 if o.threshold is None else float(o.threshold))

    def load_plan(self, raw: dict, source: str) -> MergePlan:
        return MergePlan.from_dict(raw, source=source)

    def validate_plan(self, plan: MergePlan, adapter: MoEAdapter) -> None:
        plan.validate(adapter)
        MERGES.get(plan.merge)

    def next_config(self, plan: MergePlan, adapter: MoEAdapter) -> Any:
        cfg = config_copy(adapter)
        adapter.set_config_experts(cfg, len(next(iter(plan.groups.values()))))
        return cfg

    # ------------------------------------------------------------------ surgery
    def apply_layer(self, model, adapter: MoEAdapter, plan: MergePlan, layer: int) -> None:
        from moeprune.surgery.merge import merge_layer

        merge_layer(model, adapter, plan, layer)

    def reference(self, ref, plan: MergePlan) -> None:
        layer_merge = MERGES.get(plan.merge)(plan)
        for layer in ref.scope(plan.layers):
            current = [ref.read_expert(layer, i) for i in range(len(ref.slots[layer]))]
            merged = layer_merge(current, plan.groups[layer], plan.weights[layer])
            if plan.router == "weighted":
                ref.weighted_router_rows(layer, plan.groups[layer], plan.weights[layer])
            for group, expert in zip(plan.groups[layer], merged, strict=True):
                ref.write_expert(layer, group[0], expert)

    def survivors(self, plan: MergePlan) -> dict[int, list[int]]:
        return {layer: plan.dominants(layer) for layer in plan.layers}

    # ------------------------------------------------------------------ reports
    def provenance(self, plan: MergePlan) -> dict:
        return {"method": plan.method, "ratio": plan.ratio, "merge": plan.merge, "router": plan.router,
                "merge_plan_sha256": plan.sha256()}

    def report(self, plan: MergePlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        kept = len(next(iter(plan.groups.values())))
        return {
            "stage": self.kind, "method": plan.method, "ratio": plan.ratio, "merge": plan.merge,
            "router": plan.router, "rank": plan.rank, "threshold": plan.threshold if plan.merge == "dern" else None,
            "merge_plan_sha256": plan.sha256(), "num_experts_before": plan.num_experts, "num_experts_after": kept,
            "merge_groups": {str(k): v for k, v in sorted(plan.groups.items())},
            "loadable_by_stock_config": True, "note": plan.note or f"merge groups and weights: {MERGE_PLAN_NAME}",
        }

    def describe(self, plan: MergePlan) -> str:
        kept = len(next(iter(plan.groups.values())))
        return f"merge ({plan.method}, {plan.merge}): {plan.num_experts} -> {kept} per MoE layer"


MERGE = register_stage(MergeStage())

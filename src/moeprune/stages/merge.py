"""Expert merging as a stage (M-SMoE, HC-SMoE, Sub-MoE, DERN): groups from calibration statistics (`MergePlan`).

    groups[ℓ] = grouping(statistics with probes)                 n = E − drop groups per MoE layer (`merge/`)
    merged g  = merge(experts of group g, usage weights)         average | svd | dern (`merge/methods.py`)
Surgery keeps the dominants' slots and writes the merged weights there (`surgery/merge.py`); the reference keeps
every slot of the original, writes each group's merged expert into its dominant's slot and masks the members
in the original's own router (`stages/reference.py`), so slicing and renumbering are checked independently.

The dern merge's threshold is `auto` by default: chosen per layer from the segment similarities of the model as the
earlier stages leave it, so that the fraction `recombine` of the dropped neuron segments is recombined
(`merge/dern_threshold.py`); a number is a fixed cosine. Either way the plan records the cosine(s) and how many
segments met them (`recombined`), and warns when almost none did. With `recombine` 0 (the default) no segment is
recombined: the plan's threshold is None and no layer is read for similarities.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from moeprune.errors import MoePruneError
from moeprune.merge import dern_threshold
from moeprune.merge.build import BUDGETS, make_merge_plan
from moeprune.merge.dern_threshold import DEFAULT_RECOMBINE
from moeprune.merge.grouping import GROUPINGS
from moeprune.merge.methods import MERGES, unchanged
from moeprune.merge.plan import MERGE_FORMAT, ROUTER_STRATEGIES, MergePlan
from moeprune.models.base import MoEAdapter
from moeprune.select.uniform import drop_count
from moeprune.stages.base import Need, Stage, StageOptions, config_copy, register_stage

MERGE_PLAN_NAME = "moeprune_merge.json"
AUTO = "auto"


@dataclass(frozen=True)
class MergeOptions(StageOptions):
    budget: str = "uniform"
    merge: str | None = None
    router: str = "dominant"
    rank: int | None = None
    threshold: float | str | None = None  # dern: a cosine, or "auto" (the default: chosen from the data)
    recombine: float | None = None  # dern with threshold auto: fraction of dropped segments recombined
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
        fixed = o.threshold is not None and o.threshold != AUTO
        if fixed and (isinstance(o.threshold, bool) or not isinstance(o.threshold, (int, float))
                      or not -1.0 <= float(o.threshold) <= 1.0):
            raise MoePruneError(f"--threshold {o.threshold!r}: give a cosine in [-1, 1] or 'auto' (chosen from the "
                                "segment similarities).")
        if o.recombine is not None and (merge != "dern" or fixed):
            why = (f"method {o.method} merges with {merge!r}" if merge != "dern"
                   else f"--threshold {o.threshold} fixes the cosine")
            raise MoePruneError(f"--recombine sets the fraction of neuron segments dern recombines with --threshold "
                                f"auto; {why}. Drop --recombine" + (" or --threshold." if fixed else "."))
        if o.recombine is not None and (isinstance(o.recombine, bool) or not isinstance(o.recombine, (int, float))
                                        or not 0.0 <= o.recombine <= 1.0):
            raise MoePruneError(f"--recombine {o.recombine!r} is a fraction of the dropped neuron segments: give a "
                                "number in [0, 1].")

    def needs(self, o: MergeOptions) -> set[Need]:
        return {Need.ROUTED, Need.PROBES}

    def check(self, o: MergeOptions, adapter: MoEAdapter) -> Any:
        from moeprune.models.capabilities import require

        require(adapter, "merge")
        n_drop = drop_count(o.ratio, adapter.num_experts, adapter.routing())
        cfg = config_copy(adapter)
        adapter.set_config_experts(cfg, adapter.num_experts - n_drop)
        return cfg

    # ------------------------------------------------------------------ plans
    def plan(self, o: MergeOptions, ctx) -> MergePlan:
        fixed = o.threshold is not None and o.threshold != AUTO
        recombine = None if fixed else (DEFAULT_RECOMBINE if o.recombine is None else float(o.recombine))
        if self.merge_of(o) == "dern" and recombine and ctx.ckpt is None:
            raise MoePruneError(f"dern with --recombine {recombine:g} chooses its threshold from the expert weights, "
                                "which a statistics file does not hold: give --threshold COSINE (e.g. 0.2), leave "
                                "--recombine at 0 (the default: nothing recombined, no weights needed), or run "
                                "`moeprune prune MODEL --method dern --calib NAME=PATH`, which reads them.")
        stats = ctx.routed_stats()
        plan = make_merge_plan(stats, o.method, o.ratio, calib_set=list(o.calib_set) if o.calib_set else None,
                               budget=o.budget, merge=o.merge, router=o.router, rank=o.rank,
                               **({"threshold": float(o.threshold)} if fixed else {}))
        if plan.merge != "dern" or (ctx.ckpt is None and recombine is None):  # a fixed threshold, no weights
            return plan
        return dern_threshold.resolve(plan, layer_experts(ctx), recombine)  # recombine 0 reads no layer

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
            merged = layer_merge(current, plan.groups[layer], plan.weights[layer], layer=layer)
            if plan.router == "weighted":
                ref.weighted_router_rows(layer, plan.groups[layer], plan.weights[layer])
            for group, expert in zip(plan.groups[layer], merged, strict=True):
                if not unchanged(expert, current, group):  # a survivor as it is already holds its values
                    ref.write_expert(layer, group[0], expert)

    def survivors(self, plan: MergePlan) -> dict[int, list[int]]:
        return {layer: plan.dominants(layer) for layer in plan.layers}

    # ------------------------------------------------------------------ reports
    def provenance(self, plan: MergePlan) -> dict:
        return {"method": plan.method, "ratio": plan.ratio, "merge": plan.merge, "router": plan.router,
                "merge_plan_sha256": plan.sha256()}

    def report(self, plan: MergePlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        kept = len(next(iter(plan.groups.values())))
        dern = plan.merge == "dern"
        return {
            "stage": self.kind, "method": plan.method, "ratio": plan.ratio, "merge": plan.merge,
            "router": plan.router, "rank": plan.rank, "threshold": plan.to_dict()["threshold"] if dern else None,
            "recombine": plan.recombine if dern else None,
            "recombined": {str(k): v for k, v in sorted(plan.recombined.items())} if dern and plan.recombined else None,
            "merge_plan_sha256": plan.sha256(), "num_experts_before": plan.num_experts, "num_experts_after": kept,
            "merge_groups": {str(k): v for k, v in sorted(plan.groups.items())},
            "loadable_by_stock_config": True, "note": plan.note or f"merge groups and weights: {MERGE_PLAN_NAME}",
        }

    def describe(self, plan: MergePlan) -> str:
        kept = len(next(iter(plan.groups.values())))
        text = f"merge ({plan.method}, {plan.merge}): {plan.num_experts} -> {kept} per MoE layer"
        if plan.merge == "dern" and plan.threshold is None:
            text += "; no neuron segment recombined (recombine 0: the dropped experts are pruned)"
        elif plan.merge == "dern" and plan.recombined:
            n, of = (sum(x[i] for x in plan.recombined.values()) for i in (0, 1))
            text += f"; {n} of {of} dropped neuron segments recombined ({n / max(of, 1):.0%})"
        return text


def layer_experts(ctx) -> Iterator[tuple[int, list[dict]]]:
    """(MoE layer, every expert of it in canonical roles, on the CPU) of the model as the earlier stages leave it:
    loaded whole, or with `ctx.lazy` one decoder layer at a time (`StageContext.lazy_model`)."""
    from moeprune.models import get_adapter
    from moeprune.surgery.merge import expert_of

    if ctx.lazy:
        lazy, layer_context = ctx.lazy_model()
        model, adapter = lazy.model, get_adapter(lazy.model.config, model=lazy.model)
        for layer in adapter.moe_layers():
            with layer_context(layer):
                roles = adapter.expert_roles(adapter.block(model, layer))
                yield layer, [expert_of(roles, j) for j in range(adapter.num_experts)]
        return
    model = ctx.model(device="cpu")
    adapter = get_adapter(model.config, model=model)
    for layer in adapter.moe_layers():
        roles = adapter.expert_roles(adapter.block(model, layer))
        yield layer, [expert_of(roles, j) for j in range(adapter.num_experts)]


MERGE = register_stage(MergeStage())

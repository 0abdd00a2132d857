"""Neuron removal inside the routed experts as a stage (HEAPr, CAMERA-P): `NeuronPlan`.

    scores[ℓ] = criterion(neuron statistics [, gradients])      [E, I] per MoE layer (`criteria/neurons.py`)
    kept      = budget(scores, ratio, min_width, align 8)       expert | layer | global (`select/neurons.py`)
`ratio` is the fraction of routed-expert parameters (neurons) removed. Surgery slices gate/up rows and down
columns (`surgery/neurons.py`; layer/global budgets keep per-layer widths, zero-padded: `surgery/neurons_padded.py`,
loadable with `moeprune.load_model` only, so such a stage must be a recipe's last). The reference zeroes the
down-projection columns of removed neurons in the original (`surgery/neurons.mask_neurons`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.criteria.neurons import NEURON_CRITERIA, neuron_scores
from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.select.neuron_plan import NEURON_FORMAT, NeuronPlan
from moeprune.select.neurons import check_budget, expert_width_kept, select_neurons
from moeprune.stages.base import Need, Stage, StageOptions, config_copy, register_stage

NEURON_PLAN_NAME = "moeprune_neurons.json"
ALIGN = 8  # kept widths are multiples of 8: transformers' grouped_mm experts kernel needs 16-byte rows


@dataclass(frozen=True)
class NeuronOptions(StageOptions):
    budget: str = "expert"
    min_width: int = 1
    rho: float | None = None  # CAMERA-P only; 0.9 when not given


class NeuronStage(Stage):
    kind = "neurons"
    plan_format = NEURON_FORMAT
    legacy_plan_name = NEURON_PLAN_NAME
    options_type = NeuronOptions

    @classmethod
    def methods(cls) -> list[str]:
        return list(NEURON_CRITERIA)

    def final_only(self, o: NeuronOptions) -> str | None:
        """Layer/global budgets give per-expert widths that no later stage (nor a stock config) can take."""
        if o.budget == "expert":
            return None
        return (f"{o.budget!r} budget leaves experts of different widths that no later stage can take. Make it "
                "the last stage or give it budget: expert")

    # ------------------------------------------------------------------ options
    def validate_options(self, o: NeuronOptions) -> None:
        NEURON_CRITERIA.get(o.method)
        if o.rho is not None and o.method != "camera":
            raise MoePruneError(f"--rho weighs CAMERA-P's peak term; method {o.method} has none. Drop --rho.")
        if o.rho is not None and not 0 <= float(o.rho) <= 1:
            raise MoePruneError(f"--rho {o.rho} must lie in [0, 1].")

    def needs(self, o: NeuronOptions) -> set[Need]:
        return {Need.NEURONS} | ({Need.GRADIENTS} if NEURON_CRITERIA.get(o.method).needs_gradients else set())

    def check(self, o: NeuronOptions, adapter: MoEAdapter) -> Any:
        from moeprune.models.capabilities import require

        require(adapter, "neurons")
        width = adapter.expert_width
        if width is None:
            raise MoePruneError(f"config has no expert width ({adapter.intermediate_key}); cannot plan neurons.")
        check_budget(o.ratio, o.budget, o.min_width, width, align=ALIGN, num_experts=adapter.num_experts,
                     num_layers=len(adapter.moe_layers()))
        cfg = config_copy(adapter)
        if o.budget == "expert":
            from moeprune.surgery.neurons import companions

            kept = expert_width_kept(o.ratio, width, o.min_width, ALIGN)
            extra = companions(cfg, adapter, kept, ALIGN)  # refuses widths no stock config can describe
            adapter.set_config_width(cfg, kept)
            for key, value in extra.items():
                setattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, key, value)
        return cfg

    # ------------------------------------------------------------------ plans
    def plans_per_layer(self, o: NeuronOptions) -> bool:
        """An expert budget chooses each layer's neurons from that layer's scores alone; a forward-only criterion
        has them when the forward pass leaves the layer (HEAPr's gradients come top down, after every layer)."""
        return o.budget == "expert" and not NEURON_CRITERIA.get(o.method).needs_gradients

    def plan(self, o: NeuronOptions, ctx) -> NeuronPlan:
        from moeprune.stats.neurons import collect_neuron_stats

        crit = NEURON_CRITERIA.get(o.method)
        width = ctx.adapter.expert_width
        adapter = ctx.adapter
        dtype = ctx.calib.dtype if ctx.calib is not None else "auto"  # --dtype, as routed statistics use it
        params = {"rho": 0.9 if o.rho is None else o.rho} if o.method == "camera" else {}
        kept: dict[int, dict[int, list[int]]] = {}

        def plan_of(layer_kept: dict[int, dict[int, list[int]]]) -> NeuronPlan:
            return NeuronPlan(layer_kept, width, method=o.method, ratio=o.ratio, budget=o.budget,
                              model_type=adapter.model_type)

        if ctx.lazy and self.plans_per_layer(o):  # each layer's neurons chosen as its sums complete, while it is held
            from moeprune.stats.neurons_layered import neuron_stats

            view = ctx.layer_view(dtype=dtype)

            def visit(layer: int, layer_stats) -> None:  # the sums on the device the layer runs on
                layer_stats = layer_stats.to("cpu")  # scores and selection on the CPU, as after the pass
                kept.update(select_neurons(neuron_scores(o.method, {layer: layer_stats}, **params), o.ratio,
                                           o.budget, o.min_width, align=ALIGN))
                ctx.layer_planned(view, layer, lambda: self.apply_layer(view.model, adapter, plan_of(
                    {layer: kept[layer]}), layer))

            stats = neuron_stats(ctx, False, lazy=view.lazy, layer_context=view.layer, dtype=dtype, inputs=False,
                                 on_layer_stats=visit)
            del view
        elif ctx.lazy:  # one decoder layer in memory at a time; HEAPr backpropagates layer by layer, top down
            from moeprune.stats.neurons_layered import neuron_stats

            lazy, layer_context = (ctx.lazy_model(dtype=dtype, head=crit.needs_gradients) if ctx.previous
                                   else (None, None))
            stats = neuron_stats(ctx, crit.needs_gradients, lazy=lazy, layer_context=layer_context, dtype=dtype,
                                 inputs=False)  # no in_sq: only Wanda reads it
            del lazy
        else:
            model = ctx.model(dtype=dtype)
            adapter = get_adapter(model.config, model=model)
            stats = collect_neuron_stats(model, adapter, ctx.sets, gradients=crit.needs_gradients,
                                         batch_size=ctx.calib.batch_size, inputs=False)
            del model
        if not kept:
            kept = select_neurons(neuron_scores(o.method, stats, **params), o.ratio, o.budget, o.min_width,
                                  align=ALIGN)
        plan = plan_of(kept)
        widths = sorted({len(v) for d in kept.values() for v in d.values()})
        logger.info("%s (%s budget): experts keep %s of %d neurons", o.method, o.budget,
                    widths[0] if len(widths) == 1 else f"{widths[0]}..{widths[-1]} (non-uniform)", width)
        return plan

    def load_plan(self, raw: dict, source: str) -> NeuronPlan:
        return NeuronPlan.from_dict(raw, source=source)

    def next_config(self, plan: NeuronPlan, adapter: MoEAdapter) -> Any:
        from moeprune.surgery.neurons import check_uniform, set_neuron_config

        cfg = config_copy(adapter)
        if plan.uniform_width is not None:
            set_neuron_config(cfg, adapter, plan, check_uniform(cfg, adapter, plan, ALIGN))
        return cfg

    # ------------------------------------------------------------------ surgery
    def check_apply(self, model, adapter: MoEAdapter, plan: NeuronPlan) -> None:
        from moeprune.surgery.neurons import check_uniform
        from moeprune.surgery.neurons_padded import check_padded

        plan.validate(adapter, model)
        if plan.uniform_width is not None:
            check_uniform(adapter.root_config, adapter, plan, ALIGN)
            return
        if model is not None:
            check_padded(model, adapter, plan, plan.layers)
        logger.warning("the neuron plan (%s budget) keeps different widths per expert: the export is NOT "
                       "loadable by stock transformers/vLLM; load it with moeprune.load_model (see the "
                       "report)", plan.budget)

    def apply_layer(self, model, adapter: MoEAdapter, plan: NeuronPlan, layer: int) -> None:
        from moeprune.surgery.neurons import slice_layer
        from moeprune.surgery.neurons_padded import check_padded, pad_layer

        if layer not in plan.kept_neurons:
            return
        if plan.uniform_width is not None:
            slice_layer(model, adapter, plan, layer)
        else:
            check_padded(model, adapter, plan, [layer])
            pad_layer(model, adapter, plan, layer, ALIGN)

    def finish_export(self, folder: Path, model_type: str, plan: NeuronPlan) -> None:
        from moeprune.io import nonuniform
        from moeprune.surgery.neurons_padded import layer_widths

        if plan.uniform_width is None:
            nonuniform.mark(folder, model_type, layer_widths(plan, ALIGN),
                            {layer: {j: len(v) for j, v in d.items()} for layer, d in plan.kept_neurons.items()})

    def reference(self, ref, plan: NeuronPlan) -> None:
        """Zero the down-projection columns of every removed neuron (at its position in the original slot)."""
        for layer in plan.layers:
            ref.keep_neurons(layer, plan.kept_neurons[layer])
        ref.zero_removed_neurons()

    # ------------------------------------------------------------------ reports
    def provenance(self, plan: NeuronPlan) -> dict:
        return {"method": plan.method, "ratio": plan.ratio, "budget": plan.budget,
                "neuron_plan_sha256": plan.sha256()}

    def report(self, plan: NeuronPlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        from moeprune.io import nonuniform
        from moeprune.surgery.neurons_padded import layer_widths

        uniform = plan.uniform_width is not None
        widths = {layer: plan.uniform_width for layer in plan.layers} if uniform else layer_widths(plan, ALIGN)
        return {
            "stage": self.kind, "method": plan.method, "ratio": plan.ratio, "budget": plan.budget,
            "neuron_plan_sha256": plan.sha256(), "expert_width_before": plan.width,
            "expert_width_after": plan.uniform_width,
            "layer_widths": {str(k): v for k, v in sorted(widths.items())},
            "num_experts_before": before.num_experts, "num_experts_after": before.num_experts,
            "loadable_by_stock_config": uniform,
            "note": (f"kept neurons per expert and layer: {NEURON_PLAN_NAME}" if uniform else
                     "NON-UNIFORM expert widths: stock from_pretrained refuses this folder (model_type "
                     f"{nonuniform.SENTINEL!r}); load it with moeprune.load_model. Each layer stores its widest "
                     f"expert's width (layer_widths); narrower experts are zero-padded. Kept neurons: "
                     f"{NEURON_PLAN_NAME}"),
        }

    def describe(self, plan: NeuronPlan) -> str:
        after = plan.uniform_width or "non-uniform"
        return f"neurons ({plan.method}, {plan.budget} budget): width {plan.width} -> {after}"


NEURONS = register_stage(NeuronStage())


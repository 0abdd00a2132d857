"""Intra-expert pruning API (HEAPr, CAMERA-P): statistics -> neuron plan -> (expert +) neuron surgery.

    plan = make_neuron_plan("ckpt", "heapr", 0.25, CalibrateOptions(("web=web.txt",)), budget="expert")
    apply_neuron_plan_to("ckpt", plan, "out")                       # slice, save (atomic), report

Combined plans: with `expert_plan`, the experts are removed first (in memory) and the neuron statistics are
collected on that pruned model, so neuron indices and scores refer to the survivors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from moeprune import __version__
from moeprune.calibration.run import CalibrateOptions, prepare
from moeprune.criteria.neurons import NEURON_CRITERIA, neuron_scores
from moeprune.errors import MoePruneError
from moeprune.io import nonuniform
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model, match_disk_dtypes
from moeprune.io.report import REPORT_NAME, write_json_atomic
from moeprune.io.verify import VerifyResult
from moeprune.io.verify_neurons import verify_neurons
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.select.neurons import check_budget, select_neurons
from moeprune.select.plan import PrunePlan
from moeprune.stats.neurons import collect_neuron_stats
from moeprune.surgery.in_memory import apply_plan as remove_experts
from moeprune.surgery.neurons import apply_neuron_plan
from moeprune.surgery.neurons_padded import apply_neuron_plan_padded

NEURON_PLAN_NAME = "moeprune_neurons.json"
ALIGN = 8  # kept widths are multiples of 8: transformers' grouped_mm experts kernel needs 16-byte rows


def make_neuron_plan(model: str | Path, method: str, ratio: float, calib: CalibrateOptions, *,
                     budget: str = "expert", min_width: int = 1, rho: float = 0.9,
                     expert_plan: PrunePlan | None = None) -> NeuronPlan:
    """Score every neuron of every routed expert with `method` on `calib`, keep the best under `budget`.

    `ratio` = fraction of the (surviving) routed experts' neurons, i.e. parameters, removed."""
    crit = NEURON_CRITERIA.get(method)
    ckpt, adapter, sets = prepare(model, calib)  # cheap checks + tokenised data before the model loads
    width = adapter.expert_width
    if width is None:
        raise MoePruneError(f"config has no expert width ({adapter.intermediate_key}); cannot plan neurons.")
    check_budget(ratio, budget, min_width, width)
    if not 0 <= rho <= 1:
        raise MoePruneError(f"--rho {rho} must lie in [0, 1].")
    if expert_plan is not None:
        expert_plan.validate(adapter)
    model_obj = load_model(ckpt.path, dtype="float32", device=calib.device)
    if expert_plan is not None:
        remove_experts(model_obj, adapter, expert_plan)
        adapter = get_adapter(model_obj.config, model=model_obj)
    stats = collect_neuron_stats(model_obj, adapter, sets, gradients=crit.needs_gradients,
                                 batch_size=calib.batch_size)
    scores = neuron_scores(method, stats, **({"rho": rho} if method == "camera" else {}))
    kept = select_neurons(scores, ratio, budget, min_width, align=ALIGN)
    plan = NeuronPlan(kept, width, method=method, ratio=ratio, budget=budget, model_type=adapter.model_type)
    widths = sorted({len(v) for d in kept.values() for v in d.values()})
    logger.info("%s (%s budget): experts keep %s of %d neurons", method, budget,
                widths[0] if len(widths) == 1 else f"{widths[0]}..{widths[-1]} (non-uniform)", width)
    return plan


@dataclass
class NeuronApplyResult:
    out: Path
    report: dict


def apply_neuron_plan_to(model: str | Path, plan: NeuronPlan, out: str | Path, *,
                         expert_plan: PrunePlan | None = None, overwrite: bool = False) -> NeuronApplyResult:
    """[remove `expert_plan`'s experts, then] slice every expert to the plan's neurons; save to `out` atomically
    with the tokenizer, the neuron plan (`moeprune_neurons.json`) and `moeprune_report.json`."""
    ckpt = Checkpoint.open(model)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    out_path = check_output(out, [ckpt.path], overwrite)
    if expert_plan is not None:
        expert_plan.validate(adapter)
    uniform = plan.uniform_width is not None
    if not uniform:
        logger.warning("the neuron plan (%s budget) keeps different widths per expert: the export is NOT loadable "
                       "by stock transformers/vLLM; load it with moeprune.load_model (see the report)", plan.budget)
    with atomic_dir(out_path) as tmp:
        model_obj = load_model(ckpt.path, dtype="auto")
        match_disk_dtypes(model_obj, ckpt.torch_dtypes())
        if expert_plan is not None:
            remove_experts(model_obj, adapter, expert_plan)
        current = get_adapter(model_obj.config, model=model_obj)
        if uniform:
            apply_neuron_plan(model_obj, current, plan, align=ALIGN)
            widths = {layer: plan.uniform_width for layer in plan.layers}
        else:
            widths = apply_neuron_plan_padded(model_obj, current, plan, align=ALIGN)
        model_obj.config.moeprune = {"version": __version__, "method": plan.method, "ratio": plan.ratio,
                                     "budget": plan.budget, "source": str(ckpt.path),
                                     "neuron_plan_sha256": plan.sha256()}
        model_obj.save_pretrained(tmp)
        del model_obj
        if not uniform:
            nonuniform.mark(tmp, adapter.model_type, widths,
                            {layer: {j: len(v) for j, v in d.items()} for layer, d in plan.kept_neurons.items()})
        bytes_after = Checkpoint.open(tmp).total_bytes
        ckpt.copy_side_files(tmp)
        plan.save(tmp / NEURON_PLAN_NAME)
        report = {
            "moeprune_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": str(ckpt.path), "model_type": adapter.model_type, "method": plan.method,
            "ratio": plan.ratio, "budget": plan.budget, "neuron_plan_sha256": plan.sha256(),
            "expert_width_before": plan.width, "expert_width_after": plan.uniform_width,
            "layer_widths": {str(k): v for k, v in sorted(widths.items())},
            "num_experts_before": adapter.num_experts,
            "num_experts_after": expert_plan.kept_count if expert_plan is not None else adapter.num_experts,
            "kept_experts": ({str(k): v for k, v in sorted(expert_plan.kept_experts.items())}
                             if expert_plan is not None else None),
            "weight_bytes_before": ckpt.total_bytes, "weight_bytes_after": bytes_after,
            "loadable_by_stock_config": uniform,
            "note": (f"kept neurons per expert and layer: {NEURON_PLAN_NAME}" if uniform else
                     "NON-UNIFORM expert widths: stock from_pretrained refuses this folder (model_type "
                     f"{nonuniform.SENTINEL!r}); load it with moeprune.load_model. Each layer stores its widest "
                     f"expert's width (layer_widths); narrower experts are zero-padded. Kept neurons: "
                     f"{NEURON_PLAN_NAME}"),
        }
        write_json_atomic(tmp / REPORT_NAME, report)
    logger.info("wrote %s (%.1f%% of the original weight bytes)", out_path, 100 * bytes_after / ckpt.total_bytes)
    return NeuronApplyResult(out_path, report)


def prune_neurons(model: str | Path, out: str | Path, *, method: str, ratio: float, calib: CalibrateOptions,
                  budget: str = "expert", min_width: int = 1, rho: float = 0.9,
                  expert_plan: PrunePlan | None = None, overwrite: bool = False,
                  run_verify: bool = True) -> tuple[NeuronApplyResult, VerifyResult | None]:
    """Plan (statistics on `calib`) + apply + save + verify against the original with neurons zeroed."""
    check_output(out, [Checkpoint.open(model).path], overwrite)
    plan = make_neuron_plan(model, method, ratio, calib, budget=budget, min_width=min_width, rho=rho,
                            expert_plan=expert_plan)
    applied = apply_neuron_plan_to(model, plan, out, expert_plan=expert_plan, overwrite=overwrite)
    result = None
    if run_verify:
        result = verify_neurons(model, applied.out, expert_plan, plan)
        applied.report["verify"] = result.to_dict()
        write_json_atomic(applied.out / REPORT_NAME, applied.report)
    return applied, result

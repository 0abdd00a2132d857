"""Expert-merging API (M-SMoE, HC-SMoE, Sub-MoE, DERN): statistics -> merge plan -> merged checkpoint -> verify.

    plan = make_merge_plan("stats.safetensors", "hcsmoe", 0.25)         # groups from calibration statistics
    apply_merge_plan_to("ckpt", plan, "out")                           # merge, save (atomic), report
    verify_merge("ckpt", "out")                                        # stock reload == in-memory merge
    prune_merge("ckpt", "out", method="msmoe", ratio=0.5, calib=CalibrateOptions(("web=web.txt",)))

The export holds len(groups) experts per MoE layer in a stock config (fewer expert tensors, one router row each),
so stock `from_pretrained` (and vLLM) load it as a smaller model of the same family.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from moeprune import __version__
from moeprune.api import DEFAULT_TOL
from moeprune.calibration.run import CalibrateOptions, calibrate
from moeprune.errors import MoePruneError
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model, match_disk_dtypes, parse_dtype
from moeprune.io.report import REPORT_NAME, write_json_atomic
from moeprune.io.verify import VerifyResult, compare, logits_of, saved_logits
from moeprune.log import logger
from moeprune.merge.build import BUDGETS, make_merge_plan
from moeprune.merge.grouping import GROUPINGS
from moeprune.merge.methods import MERGES
from moeprune.merge.plan import ROUTER_STRATEGIES, MergePlan
from moeprune.models import get_adapter
from moeprune.select.uniform import drop_count
from moeprune.surgery.merge import apply_merge_plan

MERGE_PLAN_NAME = "moeprune_merge.json"
STATS_NAME = "moeprune_stats.safetensors"

__all__ = ["MERGE_PLAN_NAME", "MergeApplyResult", "apply_merge_plan_to", "make_merge_plan", "prune_merge",
           "verify_merge"]


@dataclass
class MergeApplyResult:
    out: Path
    report: dict


def merge_report(plan: MergePlan, source: Path, bytes_before: int, bytes_after: int) -> dict:
    kept = len(next(iter(plan.groups.values())))
    return {
        "moeprune_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": str(source),
        "model_type": plan.model_type, "method": plan.method, "ratio": plan.ratio, "merge": plan.merge,
        "router": plan.router, "rank": plan.rank, "threshold": plan.threshold if plan.merge == "dern" else None,
        "merge_plan_sha256": plan.sha256(), "num_experts_before": plan.num_experts, "num_experts_after": kept,
        "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after,
        "merge_groups": {str(k): v for k, v in sorted(plan.groups.items())},
        "loadable_by_stock_config": True, "note": plan.note or f"merge groups and weights: {MERGE_PLAN_NAME}",
    }


def apply_merge_plan_to(model: str | Path, plan: MergePlan, out: str | Path, *,
                        overwrite: bool = False) -> MergeApplyResult:
    """Merge every MoE layer's groups (in memory) and save to `out` atomically with the tokenizer, the merge plan
    (`moeprune_merge.json`) and `moeprune_report.json`."""
    ckpt = Checkpoint.open(model)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    plan.validate(adapter)
    MERGES.get(plan.merge)
    out_path = check_output(out, [ckpt.path], overwrite)
    with atomic_dir(out_path) as tmp:
        model_obj = load_model(ckpt.path, dtype="auto")
        match_disk_dtypes(model_obj, ckpt.torch_dtypes())
        apply_merge_plan(model_obj, get_adapter(model_obj.config, model=model_obj), plan)
        model_obj.config.moeprune = {"version": __version__, "method": plan.method, "ratio": plan.ratio,
                                     "merge": plan.merge, "router": plan.router, "source": str(ckpt.path),
                                     "merge_plan_sha256": plan.sha256()}
        model_obj.save_pretrained(tmp)
        del model_obj
        bytes_after = Checkpoint.open(tmp).total_bytes
        ckpt.copy_side_files(tmp)
        plan.save(tmp / MERGE_PLAN_NAME)
        report = merge_report(plan, ckpt.path, ckpt.total_bytes, bytes_after)
        write_json_atomic(tmp / REPORT_NAME, report)
    logger.info("wrote %s (%.1f%% of the original weight bytes)", out_path, 100 * bytes_after / ckpt.total_bytes)
    return MergeApplyResult(out_path, report)


def verify_merge(original: str | Path, merged: str | Path, plan: MergePlan | None = None, *, seed: int = 0,
                 batch: int = 2, seq_len: int = 32, dtype: str = "float32", tol: float = 1e-4) -> VerifyResult:
    """The saved MERGED folder, loaded by stock `from_pretrained`, must equal ORIGINAL merged in memory with the same
    plan (read from MERGED/moeprune_merge.json by default), and its config must hold fewer experts.

        pass ⇔ max |logits_saved − logits_in_memory| ≤ tol · max |logits_in_memory|   (non-padding positions)"""
    src, dst = Checkpoint.open(original), Checkpoint.open(merged)
    if plan is None:
        if not (dst.path / MERGE_PLAN_NAME).is_file():
            raise MoePruneError(f"{dst.path} has no {MERGE_PLAN_NAME}; pass --plan MERGE_PLAN.json.")
        plan = MergePlan.load(dst.path / MERGE_PLAN_NAME)
    adapter = get_adapter(src.config, weight_keys=src.names())
    plan.validate(adapter)
    kept = len(next(iter(plan.groups.values())))
    count = getattr(dst.config.get_text_config(), adapter.count_key, None)
    if count != kept or not kept < adapter.num_experts:
        raise MoePruneError(f"merged config has {adapter.count_key}={count}; the plan merges "
                            f"{adapter.num_experts} experts into {kept} per layer.")
    inputs, got = saved_logits(src, dst, batch, seq_len, seed, dtype)
    logger.info("verify: merging original %s in memory (%s, %s router rows)", src.path, plan.merge, plan.router)
    reference = load_model(src.path, dtype=dtype)
    apply_merge_plan(reference, get_adapter(reference.config, model=reference), plan)
    want = logits_of(reference, inputs)
    return compare(want, got, inputs["attention_mask"], tol)


def prune_merge(model: str | Path, out: str | Path, *, method: str, ratio: float, calib: CalibrateOptions,
                budget: str = "uniform", merge: str | None = None, router: str = "dominant", rank: int | None = None,
                threshold: float = 0.4, overwrite: bool = False, run_verify: bool = True,
                verify_dtype: str = "float32") -> tuple[MergeApplyResult, VerifyResult | None]:
    """calibrate (statistics saved as OUT/moeprune_stats.safetensors) + group + merge + save + verify.
    Every option is checked before calibration starts."""
    grouping = GROUPINGS.get(method)
    MERGES.get(merge or grouping.merge)
    if budget not in BUDGETS:
        raise MoePruneError(f"--budget {budget!r}: merges take one of {', '.join(BUDGETS)}.")
    ROUTER_STRATEGIES.get(router)
    ckpt = Checkpoint.open(model)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    check_output(out, [ckpt.path], overwrite)
    drop_count(ratio, adapter.num_experts, adapter.routing())
    if run_verify:
        parse_dtype(verify_dtype)
    calib.calib_config()
    stats = calibrate(model, calib)
    plan = make_merge_plan(stats, method, ratio, budget=budget, merge=merge, router=router, rank=rank,
                           threshold=threshold)
    applied = apply_merge_plan_to(model, plan, out, overwrite=overwrite)
    stats.save(applied.out / STATS_NAME)
    applied.report["calibration"] = stats.meta["calibration"]
    result = None
    if run_verify:
        result = verify_merge(model, applied.out, plan, dtype=verify_dtype,
                              tol=DEFAULT_TOL.get(verify_dtype, 1e-2))
        applied.report["verify"] = result.to_dict()
    write_json_atomic(applied.out / REPORT_NAME, applied.report)
    return applied, result

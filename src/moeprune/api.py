"""Public Python API; each function is one CLI subcommand (flags map 1:1 onto arguments).

    stats = calibrate("ckpt", CalibrateOptions(("web=data.txt",)), "stats.safetensors")
    plan = make_plan("stats.safetensors", method="reap", ratio=0.25)  # or make_plan("ckpt", "aimer", 0.25)
    apply_plan("ckpt", plan, "out", streaming=False)           # apply -> save (atomic)
    verify("ckpt", "out")                                      # stock reload == masked original
    prune("ckpt", "out", method="aimer", ratio=0.25)           # all of the above
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.calibration.run import CalibrateOptions, calibrate
from moeprune.criteria import CRITERIA
from moeprune.criteria.weights import summarize_checkpoint
from moeprune.errors import MoePruneError
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model, match_disk_dtypes, parse_dtype
from moeprune.io.report import REPORT_NAME, build_report, provenance, write_json_atomic
from moeprune.io.verify import VerifyResult
from moeprune.io.verify import verify as _verify
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.models.summary import ModelSummary, summarize
from moeprune.select.plan import PrunePlan
from moeprune.select.uniform import drop_count, select_uniform
from moeprune.stats.store import ExpertStats, StatsView
from moeprune.surgery.in_memory import apply_plan as apply_in_memory
from moeprune.surgery.streaming import apply_plan_streaming

STATS_NAME = "moeprune_stats.safetensors"
DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def info(model: str | Path) -> ModelSummary:
    return summarize(str(model))


def _open(model: str | Path):
    ckpt = Checkpoint.open(model)
    return ckpt, get_adapter(ckpt.config, weight_keys=ckpt.names())


def make_plan(source: str | Path | ExpertStats, method: str, ratio: float, seed: int = 0, *,
              calib_set: list[str] | None = None) -> PrunePlan:
    """Score every routed expert with `method` and keep the best (1 − ratio) per layer (uniform policy).

    `source` is a checkpoint folder (data-free methods) or a statistics file from `calibrate` (any method that
    needs calibration; `calib_set` picks which sets count, default all).
    """
    crit = CRITERIA.get(method)
    view = _model_view(source)
    routing = view.routing()
    drop_count(ratio, view.num_experts, routing)  # validate before any work
    scores = _scores(crit, view, source, seed, calib_set)
    kept = select_uniform(scores, ratio, routing, higher_keeps=crit.higher_keeps)
    plan = PrunePlan(kept, view.num_experts, method=method, ratio=ratio, model_type=view.model_type,
                     scores={layer: s.tolist() for layer, s in scores.items()})
    plan.validate(view)
    return plan


def _model_view(source: str | Path | ExpertStats) -> MoEAdapter | StatsView:
    """The checkpoint's adapter, or (for statistics) what they say about the model."""
    if isinstance(source, ExpertStats):
        return StatsView(source)
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        return StatsView(ExpertStats.load(path))
    return _open(path)[1]


def _scores(crit, view, source, seed: int, calib_set: list[str] | None) -> dict[int, torch.Tensor]:
    layers = view.moe_layers()
    if crit.needs == "calibration":
        if not isinstance(view, StatsView):
            raise MoePruneError(f"method {crit.name!r} needs calibration statistics: run `moeprune calibrate MODEL "
                                "--calib NAME=PATH --out stats.safetensors` and plan from that file, or use "
                                "`moeprune prune --calib ...`.")
        combined = view.stats.combined(calib_set)
        return {layer: crit.fn(combined[layer]) for layer in layers}
    if calib_set:
        raise MoePruneError(f"--calib-set only applies to calibrated methods; {crit.name!r} is {crit.needs}-based.")
    if crit.needs == "weights":
        if isinstance(view, StatsView):
            raise MoePruneError(f"method {crit.name!r} reads expert weights; pass the checkpoint folder, not a "
                                "statistics file.")
        ckpt, adapter = _open(source)
        summaries = summarize_checkpoint(ckpt, adapter)
        return {layer: crit.fn(summaries[layer]) for layer in layers}
    return {layer: crit.fn(view.num_experts, seed, layer) for layer in layers}


@dataclass
class ApplyResult:
    out: Path
    report: dict


def apply_plan(
    model: str | Path,
    plan: PrunePlan,
    out: str | Path,
    *,
    streaming: bool = False,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> ApplyResult:
    """Remove the plan's experts from checkpoint `model` and write the result to `out` atomically."""
    ckpt, adapter = _open(model)
    plan.validate(adapter)
    out_path = check_output(out, [ckpt.path], overwrite)
    max_bytes = parse_size(max_shard_size)
    prov = provenance(plan, ckpt.path)
    with atomic_dir(out_path) as tmp:
        if streaming:
            result = apply_plan_streaming(ckpt, adapter, plan, tmp, max_bytes)
            _add_provenance(tmp / "config.json", prov)
            bytes_after = result.bytes_out
        else:
            model_obj = load_model(ckpt.path, dtype="auto")
            match_disk_dtypes(model_obj, ckpt.torch_dtypes())
            apply_in_memory(model_obj, adapter, plan)
            model_obj.config.moeprune = prov
            model_obj.save_pretrained(tmp, max_shard_size=max_bytes)
            bytes_after = Checkpoint.open(tmp).total_bytes
            del model_obj
        ckpt.copy_side_files(tmp)
        report = build_report(plan, ckpt.path, "streaming" if streaming else "in-memory", ckpt.total_bytes,
                              bytes_after)
        write_json_atomic(tmp / REPORT_NAME, report)
    logger.info("wrote %s (%.1f%% of the original weight bytes)", out_path, 100 * bytes_after / ckpt.total_bytes)
    return ApplyResult(out_path, report)


def verify(original: str | Path, pruned: str | Path, plan: PrunePlan | None = None, *, dtype: str = "float32",
           tol: float | None = None, seed: int = 0, batch: int = 2, seq_len: int = 32) -> VerifyResult:
    tol = DEFAULT_TOL.get(dtype, 1e-2) if tol is None else tol
    return _verify(original, pruned, plan, seed=seed, batch=batch, seq_len=seq_len, dtype=dtype, tol=tol)


def prune(
    model: str | Path,
    out: str | Path,
    *,
    method: str,
    ratio: float,
    seed: int = 0,
    streaming: bool = False,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    run_verify: bool = True,
    verify_dtype: str = "float32",
    calib: CalibrateOptions | None = None,
) -> tuple[ApplyResult, VerifyResult | None]:
    """[calibrate +] plan + apply + save + verify. Checks the output folder and options before any work.

    With `calib`, the statistics are collected first and also saved as OUT/moeprune_stats.safetensors.
    """
    crit = CRITERIA.get(method)
    ckpt, adapter = _open(model)
    check_output(out, [ckpt.path], overwrite)
    parse_size(max_shard_size)
    drop_count(ratio, adapter.num_experts, adapter.routing())
    if run_verify:
        parse_dtype(verify_dtype)
    if crit.needs == "calibration" and calib is None:
        raise MoePruneError(f"method {method!r} needs calibration data: pass --calib NAME=PATH (one per domain).")
    if calib is not None:
        calib.calib_config()  # the sources exist and the options are sane
    if crit.needs != "calibration" and calib is not None:
        raise MoePruneError(f"method {method!r} is {crit.needs}-based and ignores --calib; drop --calib or choose a "
                            "calibrated method (e.g. reap, ean_mean, frequency).")
    stats = calibrate(model, calib) if calib is not None else None
    plan = make_plan(stats if stats is not None else model, method, ratio, seed=seed)
    applied = apply_plan(model, plan, out, streaming=streaming, max_shard_size=max_shard_size, overwrite=overwrite)
    if stats is not None:
        stats.save(applied.out / STATS_NAME)
        applied.report["calibration"] = stats.meta["calibration"]
        write_json_atomic(applied.out / REPORT_NAME, applied.report)
    result = None
    if run_verify:
        result = verify(model, applied.out, plan, dtype=verify_dtype)
        applied.report["verify"] = result.to_dict()
        write_json_atomic(applied.out / REPORT_NAME, applied.report)
    return applied, result


def _add_provenance(config_file: Path, prov: dict) -> None:
    cfg = json.loads(config_file.read_text())
    cfg["moeprune"] = prov
    config_file.write_text(json.dumps(cfg, indent=2))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes (transformers' convention), '500MiB' -> 500·2^20; ints are bytes."""
    if isinstance(size, int):
        value = size
    else:
        s = str(size).strip().upper()
        num = s.rstrip("KMGIB")
        unit = s[len(num):]
        if unit not in _UNITS or not num:
            raise MoePruneError(f"cannot read size {size!r}; write it like 5GB, 500MB or 2GiB.")
        try:
            value = int(float(num) * _UNITS[unit])
        except ValueError:
            raise MoePruneError(f"cannot read size {size!r}; write it like 5GB, 500MB or 2GiB.") from None
    if value <= 0:
        raise MoePruneError(f"--max-shard-size must be positive, got {size!r}.")
    return value

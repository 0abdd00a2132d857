"""Public Python API; each function is one CLI subcommand (flags map 1:1 onto arguments).

    plan = make_plan("ckpt", method="aimer", ratio=0.25)      # score -> select
    apply_plan("ckpt", plan, "out", streaming=False)           # apply -> save (atomic)
    verify("ckpt", "out")                                      # stock reload == masked original
    prune("ckpt", "out", method="aimer", ratio=0.25)           # all of the above
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
from moeprune.models.summary import ModelSummary, summarize
from moeprune.select.plan import PrunePlan
from moeprune.select.uniform import drop_count, select_uniform
from moeprune.surgery.in_memory import apply_plan as apply_in_memory
from moeprune.surgery.streaming import apply_plan_streaming

DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def info(model: str | Path) -> ModelSummary:
    return summarize(str(model))


def _open(model: str | Path):
    ckpt = Checkpoint.open(model)
    return ckpt, get_adapter(ckpt.config, weight_keys=ckpt.names())


def make_plan(model: str | Path, method: str, ratio: float, seed: int = 0) -> PrunePlan:
    """Score every routed expert with `method` and keep the best (1 − ratio) per layer (uniform policy)."""
    crit = CRITERIA.get(method)
    ckpt, adapter = _open(model)
    routing = adapter.routing()
    drop_count(ratio, adapter.num_experts, routing)  # validate before reading any weight
    if crit.needs == "weights":
        summaries = summarize_checkpoint(ckpt, adapter)
        scores = {layer: crit.fn(summaries[layer]) for layer in adapter.moe_layers()}
    elif crit.needs == "none":
        scores = {layer: crit.fn(adapter.num_experts, seed, layer) for layer in adapter.moe_layers()}
    else:
        raise MoePruneError(f"method {method!r} needs calibration statistics, which this version cannot collect yet.")
    kept = select_uniform(scores, ratio, routing, higher_keeps=crit.higher_keeps)
    plan = PrunePlan(kept, adapter.num_experts, method=method, ratio=ratio, model_type=adapter.model_type,
                     scores={layer: s.tolist() for layer, s in scores.items()})
    plan.validate(adapter)
    return plan


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
) -> tuple[ApplyResult, VerifyResult | None]:
    """plan + apply + save + verify. Checks the output folder before any work."""
    ckpt = Checkpoint.open(model)
    check_output(out, [ckpt.path], overwrite)
    parse_size(max_shard_size)
    if run_verify:
        parse_dtype(verify_dtype)
    plan = make_plan(model, method, ratio, seed=seed)
    applied = apply_plan(model, plan, out, streaming=streaming, max_shard_size=max_shard_size, overwrite=overwrite)
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

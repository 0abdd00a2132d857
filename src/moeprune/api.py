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

from moeprune.calibration.run import CalibrateOptions, calibrate
from moeprune.criteria import CRITERIA
from moeprune.errors import MoePruneError
from moeprune.eval.run import EvalOptions, EvalResult, evaluate  # noqa: F401  (public API)
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model, match_disk_dtypes, parse_dtype
from moeprune.io.report import REPORT_NAME, build_report, provenance, write_json_atomic
from moeprune.io.verify import VerifyResult
from moeprune.io.verify import verify as _verify
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.summary import ModelSummary, summarize
from moeprune.select.build import build_plan
from moeprune.select.plan import PrunePlan
from moeprune.select.progressive import criterion_decider, reconstruction_decider
from moeprune.select.protect import parse_protected
from moeprune.select.uniform import drop_count
from moeprune.stats.store import ExpertStats
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
              calib_set: list[str] | None = None, policy: str = "uniform", floor: int | None = None,
              protect: list[str] | tuple[str, ...] = (), protect_super: bool = False) -> PrunePlan:
    """Score every routed expert with `method`, select with `policy`; see `select/build.py`."""
    return build_plan(source, method, ratio, seed, calib_set=calib_set, policy=policy, floor=floor,
                      protect=protect, protect_super=protect_super)


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
    method: str | None,
    ratio: float,
    seed: int = 0,
    streaming: bool = False,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    run_verify: bool = True,
    verify_dtype: str = "float32",
    calib: CalibrateOptions | None = None,
    policy: str = "uniform",
    floor: int | None = None,
    protect: list[str] | tuple[str, ...] = (),
    protect_super: bool = False,
    as_you_go: bool = False,
) -> tuple[ApplyResult, VerifyResult | None]:
    """[calibrate +] plan + apply + save + verify. Checks the output folder and options before any work.

    With `calib`, the statistics are collected first and also saved as OUT/moeprune_stats.safetensors.
    `as_you_go` (and `policy="reconstruction"`, NAEE) choose each layer's experts during calibration and remove
    them before the next layer is calibrated (see `select/progressive.py`). NAEE needs no `method`.
    """
    if method is None and policy != "reconstruction":
        raise MoePruneError("choose a criterion with --method (or --policy reconstruction, which needs none).")
    crit = CRITERIA.get(method or "frequency")
    ckpt, adapter = _open(model)
    check_output(out, [ckpt.path], overwrite)
    parse_size(max_shard_size)
    routing = adapter.routing()
    if run_verify:
        parse_dtype(verify_dtype)
    progressive = as_you_go or policy == "reconstruction"
    if progressive and calib is None:
        raise MoePruneError("--as-you-go and --policy reconstruction select experts during calibration: pass "
                            "--calib NAME=PATH.")
    if progressive and (policy not in ("uniform", "reconstruction") or floor is not None or protect_super):
        raise MoePruneError("prune-as-you-go selects layer by layer with the uniform policy (or NAEE "
                            "reconstruction); drop --policy global/per_group, --floor and --protect-super.")
    if crit.needs == "calibration" and calib is None:
        raise MoePruneError(f"method {method!r} needs calibration data: pass --calib NAME=PATH (one per domain).")
    if method is not None and crit.needs != "calibration" and calib is not None and not progressive:
        raise MoePruneError(f"method {method!r} is {crit.needs}-based and ignores --calib; drop --calib or choose a "
                            "calibrated method (e.g. reap, ean_mean, frequency).")
    if calib is not None:
        calib.calib_config()  # the sources exist and the options are sane
    if progressive:
        plan, stats = _plan_as_you_go(model, adapter, calib, method, ratio, policy, protect)
    else:
        if policy != "global":
            drop_count(ratio, adapter.num_experts, routing)
        stats = calibrate(model, calib) if calib is not None else None
        plan = make_plan(stats if stats is not None else model, method, ratio, seed=seed, policy=policy,
                         floor=floor, protect=protect, protect_super=protect_super)
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


def _plan_as_you_go(model, adapter, calib, method, ratio, policy, protect) -> tuple[PrunePlan, ExpertStats]:
    routing, E = adapter.routing(), adapter.num_experts
    protected = parse_protected(list(protect))
    if policy == "reconstruction":
        decide, method = reconstruction_decider(ratio, routing, E, protected), "naee_reconstruction"
    else:
        decide = criterion_decider(CRITERIA.get(method), ratio, routing, E, protected)
    stats = calibrate(model, calib, decide=decide)
    dropped = {int(k): v for k, v in stats.meta["dropped_as_you_go"].items()}
    kept = {layer: [j for j in range(E) if j not in set(dropped.get(layer, []))] for layer in adapter.moe_layers()}
    plan = PrunePlan(kept, E, method=method, ratio=ratio, model_type=adapter.model_type, policy=policy,
                     protected={k: sorted(v) for k, v in protected.items() if v} or None,
                     note="chosen layer by layer during calibration (prune-as-you-go): each layer was scored on the "
                          "outputs of the already-pruned layers before it")
    plan.validate(adapter)
    return plan, stats


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

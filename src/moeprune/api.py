"""Public Python API: one function per CLI verb, arguments = the verb's flags.

    info("ckpt")                                                         moeprune info
    calibrate("ckpt", CalibrateOptions(("web=data.txt",)), "stats.safetensors")   moeprune calibrate
    plan = make_plan("stats.safetensors", "reap", 0.25)                  moeprune plan   (any stage's method)
    apply_plan("ckpt", plan, "out")                                      moeprune apply  (a plan, or an export's
                                                                                          recipe: "export/")
    prune("ckpt", "out", recipe=[{"method": "tcess_top1", "ratio": 0.25},  moeprune prune --recipe
                                 {"method": "heapr", "ratio": 0.25}], calib=CalibrateOptions(...))
    prune("ckpt", "out", method="aimer", ratio=0.25)                     moeprune prune --method (one stage)
    verify("ckpt", "out")                                                moeprune verify
    evaluate / compare / analyze                                         moeprune eval / compare / analyze
    analyze("ckpt", calib, "dir", offload=OffloadOptions(heldout=("web=test.txt",)))   analyze --offload
                                                                          (traces in memory: offload.simulate_offload)
    steer("ckpt", SteerOptions(("rec=r.txt",), ("other=o.txt",)), "plan.json")   moeprune steer (apply the plan with
                                                                          EvalOptions(steer=...) or load_model(steer=))
(`moeprune lm-eval` is `moeprune.eval.lm_eval_adapter.run_lm_eval`, an optional extra.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeprune.analysis.run import analyze  # noqa: F401  (public API)
from moeprune.calibration.run import CalibrateOptions, calibrate  # noqa: F401  (public API)
from moeprune.errors import MoePruneError
from moeprune.eval.compare import compare  # noqa: F401  (public API)
from moeprune.eval.run import EvalOptions, EvalResult, evaluate  # noqa: F401  (public API)
from moeprune.models.summary import ModelSummary, summarize
from moeprune.offload.options import OffloadOptions  # noqa: F401  (public API)
from moeprune.pipeline.context import StageContext
from moeprune.pipeline.export import STATS_NAME, ApplyResult, parse_size  # noqa: F401  (public API)
from moeprune.pipeline.recipe import Chain, check_chain, parse_recipe
from moeprune.pipeline.run import apply as _apply
from moeprune.pipeline.run import prune as _prune
from moeprune.pipeline.verify import DEFAULT_TOL, VerifyResult, as_chain  # noqa: F401  (public API)
from moeprune.pipeline.verify import verify as _verify
from moeprune.select.auto import AUTO
from moeprune.stages.base import stage_for_method
from moeprune.stats.store import ExpertStats
from moeprune.steer.run import SteerOptions, steer  # noqa: F401  (public API)

DEFAULT_METHOD = AUTO  # `prune` without --method or --recipe (benchmarks/RESULTS.md, "Choosing the method per model")


def info(model: str | Path) -> ModelSummary:
    return summarize(str(model))


def make_plan(source: str | Path | ExpertStats, method: str, ratio: float | None, *,
              calib: CalibrateOptions | None = None, **options: Any):
    """A plan of `method`'s stage: expert criteria and merges plan from a statistics file (data-free criteria from
    the checkpoint folder); neuron methods calibrate the checkpoint on `calib`. `options` = the stage's options."""
    spec = parse_recipe([{"method": method, **({} if ratio is None else {"ratio": ratio}), **options}], "")[0]
    stats = source if isinstance(source, ExpertStats) else None
    path = None if stats is not None else Path(source)
    if path is not None and path.is_file() and path.suffix == ".safetensors":
        stats = ExpertStats.load(path)
    if calib is not None and not spec.stage.plans_from_text(spec.options):  # they plan from a statistics file
        raise MoePruneError("plan reads expert statistics from a file made by `moeprune calibrate`; --calib is for "
                            "the methods that observe the model themselves (heapr, camera, wanda, fitted routing "
                            "policies). Pass the statistics file as MODEL.")
    return spec.stage.plan(spec.options, StageContext.for_source(path if stats is None else None, stats, calib,
                                                                 spec))


def apply_plan(model: str | Path, plan: Any, out: str | Path, *, streaming: bool = False, lazy: bool | None = None,
               max_shard_size: str | int = "5GB", overwrite: bool = False) -> ApplyResult:
    """Apply a plan object, plan file, recipe file or an export's plans (folder) to `model`; save to `out`.
    `lazy` (None: when the model does not fit in memory): one decoder layer in memory at a time."""
    plans: str | Path | Chain = plan if isinstance(plan, (str, Path)) else as_chain([plan])
    return _apply(model, plans, out, streaming=streaming, lazy=lazy, max_shard_size=max_shard_size,
                  overwrite=overwrite)


def prune(model: str | Path, out: str | Path, recipe: Any = None, *, method: str | None = None,
          ratio: float | None = None, calib: CalibrateOptions | None = None, streaming: bool = False,
          lazy: bool | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False, run_verify: bool = True,
          verify_dtype: str = "float32", expert_method: str | None = None, expert_ratio: float | None = None,
          repair: str | None = None, distill: dict | None = None, **options: Any
          ) -> tuple[ApplyResult, VerifyResult | None]:
    """[calibrate +] plan every stage + apply + save + verify. Give a `recipe` (list of stage dicts or a YAML/JSON
    file), or one stage as `method`, `ratio` and its `options` (`expert_method`/`expert_ratio` put an expert
    removal stage first; `repair` = KIND appends `{method: repair, kind: KIND}`; `distill` = a distill stage's
    options, e.g. {"steps": 200}, appends that stage last); no method and no recipe: `DEFAULT_METHOD` (auto, which
    needs `calib`)."""
    source = "" if recipe is None else (str(recipe) if isinstance(recipe, (str, Path)) else "recipe")
    if recipe is None and method is None and options.get("policy") != "reconstruction" and expert_method is None:
        if calib is None:
            raise MoePruneError(f"no --method given: the default, {DEFAULT_METHOD}, chooses among the calibrated "
                                "criteria (and NAEE) on calibration text; pass --calib NAME=PATH (one per domain), "
                                "or choose a method, e.g. --method aimer (data-free).")
        method = DEFAULT_METHOD
    if recipe is None:
        recipe = shorthand(method, ratio, options, expert_method, expert_ratio)
        if repair is not None:
            recipe.append({"method": "repair", "repair_kind": repair})
        if distill is not None:
            recipe.append({"method": "distill", **distill})
    elif method is not None or ratio is not None or options or expert_method or expert_ratio or repair or distill:
        raise MoePruneError("give either a recipe or --method/--ratio and their options (and --repair, "
                            "--distill-steps), not both: a recipe lists repair and distill stages itself "
                            "({method: repair, kind: compensate}, {method: distill, steps: 200}).")
    return _prune(model, out, recipe, source=source, calib=calib, streaming=streaming, lazy=lazy,
                  max_shard_size=max_shard_size, overwrite=overwrite, run_verify=run_verify, verify_dtype=verify_dtype)


def quantize(model: str | Path, out: str | Path, *, scheme: str = "w4a16", algorithm: str = "rtn",
             calib: CalibrateOptions | None = None, lazy: bool | None = None, max_shard_size: str | int = "5GB",
             overwrite: bool = False, run_verify: bool = True, verify_dtype: str = "float32", **options: Any
             ) -> tuple[ApplyResult, VerifyResult | None]:
    """`moeprune quantize`: the one-stage recipe `{method: quantize, scheme, algorithm, **options}` (group_size,
    symmetric, parts, bits, min_tokens, damp, act_order; mixed precision: avg_bits | max_bytes, allocate, granularity,
    widths), exported as a compressed-tensors checkpoint."""
    stage = {"method": "quantize", "scheme": scheme, "algorithm": algorithm, **options}
    return _prune(model, out, [stage], source="", calib=calib, lazy=lazy, max_shard_size=max_shard_size,
                  overwrite=overwrite, run_verify=run_verify, verify_dtype=verify_dtype)


def shorthand(method: str | None, ratio: float | None, options: dict, expert_method: str | None = None,
              expert_ratio: float | None = None) -> list[dict]:
    """Single-method flags as a recipe: one stage, or expert removal first with --expert-method/--expert-ratio."""
    if method is None and options.get("policy") != "reconstruction":
        raise MoePruneError("choose a method with --method (or --policy reconstruction, which needs none), or give "
                            "a --recipe.")
    removes = method is None or stage_for_method(method).takes_ratio
    if ratio is None and removes:
        raise MoePruneError("give --ratio (the fraction to remove), or a --recipe.")
    stage = {"method": method, **({"ratio": ratio} if ratio is not None or removes else {}), **options}
    if expert_method is None and expert_ratio is None:
        return [stage]
    if stage_for_method(method).kind not in ("neurons", "routing", "sparsity"):
        raise MoePruneError("--expert-method/--expert-ratio combine expert removal with a neuron method "
                            "(--method heapr|camera), a routing policy (topk, top_p, naee_skip, otp) or sparsity "
                            "inside the kept experts (wanda: STUN's recipe); for other chains write a --recipe.")
    if expert_method is None or expert_ratio is None:
        raise MoePruneError("pass --expert-method and --expert-ratio together (experts first, then the --method "
                            "stage).")
    return [{"method": expert_method, "ratio": expert_ratio}, stage]


def verify(original: str | Path, pruned: str | Path, plan: Any = None, *, dtype: str = "float32",
           tol: float | None = None, seed: int = 0, batch: int = 2, seq_len: int = 32,
           lazy: bool | None = None) -> VerifyResult:
    """The reloaded export == the original under the chained references of its plans (read from the export
    unless `plan` gives a plan object, a list of them, or (stage, plan) pairs)."""
    plans = None if plan is None else (plan if isinstance(plan, list) else [plan])
    return _verify(original, pruned, plans, dtype=dtype, tol=tol, seed=seed, batch=batch, seq_len=seq_len, lazy=lazy)


__all__ = ["CalibrateOptions", "EvalOptions", "analyze", "apply_plan", "calibrate", "check_chain", "compare",
           "evaluate", "info", "make_plan", "prune", "verify"]

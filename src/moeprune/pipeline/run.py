"""Run a recipe: check everything, plan stage by stage, export once, verify the whole chain.

    specs    = parse_recipe(recipe)                        unknown methods / options refused, naming the stage
    adapters = check_chain(specs, adapter)                 each stage on the model as the stages before leave it
    for each stage n:  plan_n = stage.plan(ctx_n)          calibrated on the original with plans 1..n-1 applied
    export(original, [plan_1 .. plan_N])                   one load (or one layer at a time: lazy), every plan
                                                           applied in order, saved atomically; lazy with a last
                                                           stage that plans layer by layer: each layer written
                                                           during that stage's pass (`pipeline/fused.py`)
    verify(original, export, chain)                        stock reload == original with the chained references,
                                                           on the seeded ids and the first VERIFY_WINDOWS windows
                                                           of every calibration set
Every check that can fail runs before the first calibration or load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

from moeprune.calibration.run import CalibrateOptions, prepare
from moeprune.errors import MoePruneError
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.fit import choose_lazy
from moeprune.io.report import write_json_atomic
from moeprune.log import logger
from moeprune.merge.align_memo import remembering
from moeprune.models import get_adapter
from moeprune.pipeline.context import StageContext
from moeprune.pipeline.export import ApplyResult, export, export_mode, parse_size
from moeprune.pipeline.fused import FusedExport, fused_problem
from moeprune.pipeline.quality import calibration_split
from moeprune.pipeline.recipe import (
    REPORT_NAME,
    Chain,
    StageSpec,
    chain_adapters,
    check_chain,
    parse_recipe,
    read_chain,
)
from moeprune.pipeline.verify import VerifyResult, first_windows, tolerance, verify
from moeprune.stages.base import adapter_after

VERIFY_WINDOWS = 2  # real windows per calibration set the final verification runs on, besides the seeded ids


def prune(model: str | Path, out: str | Path, recipe: str | Path | Mapping | Sequence, *, source: str = "recipe",
          calib: CalibrateOptions | None = None, streaming: bool = False, lazy: bool | None = None,
          max_shard_size: str | int = "5GB", overwrite: bool = False, run_verify: bool = True,
          verify_dtype: str = "float32") -> tuple[ApplyResult, VerifyResult | None]:
    """[calibrate +] plan every stage + apply + save + verify; every option is checked before any work.

    `lazy`: one decoder layer in memory at a time: every stage calibrates on the original read lazily with the
    earlier plans applied layer by layer, the export is written layer by layer and verified layer by layer.
    None (and `calib.lazy` None): chosen by whether the model fits in available memory (`io.fit.choose_lazy`);
    `calib.lazy` given and `lazy` None: that choice."""
    specs = parse_recipe(recipe, source)
    ckpt = Checkpoint.open(model)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    out_path = check_output(out, [ckpt.path], overwrite)
    parse_size(max_shard_size)
    if run_verify:
        tolerance(verify_dtype)
    adapters = check_chain(specs, adapter)
    _check_run(specs, calib)
    sets = prepare(model, calib)[2] if calib is not None else None  # read, checked and tokenised up front
    lazy = choose_lazy(calib.lazy if lazy is None and calib is not None else lazy, ckpt,
                       calib.dtype if calib is not None else "auto")
    if calib is not None:
        calib = dataclasses.replace(calib, lazy=lazy)
    refused = [(s, why) for s in specs if (why := s.stage.lazy_plan_problem(s.options))] if lazy else []
    if refused:
        raise MoePruneError(f"{refused[0][0].where}: this run goes layer by layer (--lazy, or the model does not fit "
                            f"in memory), but {refused[0][1]}.")
    if lazy and (run_verify or (calib is not None and calib.held_out)):
        for spec, before in zip(specs, adapters, strict=False):
            problem = spec.stage.lazy_reload_problem(spec.options, before)
            if problem:
                raise MoePruneError(f"{spec.where}: this run goes layer by layer (--lazy, or the model does not fit "
                                    f"in memory), but {problem}.")

    mode = export_mode([(s.stage, None) for s in specs], streaming, lazy)
    if mode == "streaming":  # e.g. a block-quantized router: found in the headers now, not after planning
        problem = next((p for s in specs if (p := s.stage.shards_problem(ckpt, adapter))), None)
        if problem:
            raise MoePruneError(f"this run edits the checkpoint's shards (--streaming, or a layer-by-layer run of "
                                f"expert removal), but {problem}")
    why = fused_problem(specs, ckpt, calib.dtype if calib is not None else None, mode, lazy)
    if why is not None and lazy:
        logger.debug("the export reads the checkpoint again after planning: %s", why)
    with atomic_dir(out_path) if why is None else nullcontext() as into:  # fused: the last pass writes into it
        fused = None if into is None else FusedExport(ckpt, into, parse_size(max_shard_size), len(specs) - 1)
        try:
            chain, stats = _plan_stages(specs, adapters, adapter, ckpt, calib, sets, lazy, fused, run_verify)
            adapters = chain_adapters(chain, adapter)
            with remembering(run_verify):  # merges: verification aligns the same pairs again (`merge/align_memo`)
                applied = export(ckpt, adapters, chain, out_path, streaming=streaming, lazy=lazy,
                                 max_shard_size=max_shard_size, options=[s.to_dict() for s in specs], stats=stats,
                                 into=into, fused=fused)
        except BaseException:
            if fused is not None:
                fused.abort()  # the writer thread stops; atomic_dir removes the folder
            raise
    calibration = next((st.meta["calibration"] for stage_stats in stats for st in stage_stats), None)
    if calibration is not None:
        applied.report["calibration"] = calibration
    result = None
    if run_verify:
        result = verify(model, applied.out, chain, dtype=verify_dtype, lazy=lazy,
                        device=calib.device if calib is not None else "cpu", seeded=True,
                        sets=first_windows(sets, VERIFY_WINDOWS) if sets is not None else None)
        applied.report["verify"] = result.to_dict()
    if sets is not None and calib.held_out:
        applied.report["calibration_split"] = calibration_split(model, applied.out, sets, batch_size=calib.batch_size,
                                                                device=calib.device, lazy=lazy)
    write_json_atomic(applied.out / REPORT_NAME, applied.report)
    return applied, result


def _plan_stages(specs: list[StageSpec], adapters: list, adapter, ckpt: Checkpoint, calib: CalibrateOptions | None,
                 sets, lazy: bool, fused, run_verify: bool = True) -> tuple[Chain, list]:
    """Plan every stage in order, each on the model as the plans before it leave it; the last one may write the
    export as it goes (`fused`). Returns the chain and each stage's statistics. A stage's pass applies the merges
    before it; their alignments are remembered (`merge/align_memo`) unless none comes again: the last stage's pass
    when it writes the export (`fused`) and nothing verifies (M-SMoE → compress on the benchmark checkpoint: 3 s
    of hashing)."""
    chain: Chain = []
    stats = []
    for n, spec in enumerate(specs):
        if n:  # the plans made so far may leave another shape than predicted (global policy): check again
            stage, plan = chain[-1]
            adapters[n:] = check_chain(specs[n:], adapter_after(adapters[n - 1], stage.next_config(plan,
                                                                                                 adapters[n - 1])),
                                       before=specs[:n])
        logger.info("stage %d/%d: %s (%s)", n + 1, len(specs), spec.options.method, spec.stage.kind)
        ctx = StageContext(ckpt, adapters[n], list(chain), calib, sets, lazy=lazy,
                           export=fused if n == len(specs) - 1 else None)
        with remembering(n < len(specs) - 1 or fused is None or run_verify):
            plan = spec.stage.plan(spec.options, ctx)
        chain.append((spec.stage, plan))
        stats.append(ctx.stats)
        logger.info("%s: %s", spec.where, spec.stage.describe(plan))
    return chain, stats


def apply(model: str | Path, plans: str | Path | Chain, out: str | Path, *, streaming: bool = False,
          lazy: bool | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False) -> ApplyResult:
    """Replay plans (an export folder, its recipe, one plan file, or (stage, plan) pairs) onto MODEL: in memory, on
    the shards (`streaming`, expert removal only) or layer by layer (`lazy`, or `streaming` with other stages)."""
    ckpt = Checkpoint.open(model)
    out_path = check_output(out, [ckpt.path], overwrite)
    chain = read_chain(plans) if isinstance(plans, (str, Path)) else list(plans)
    adapters = chain_adapters(chain, get_adapter(ckpt.config, weight_keys=ckpt.names()))
    parse_size(max_shard_size)
    lazy = choose_lazy(lazy, ckpt)
    with remembering(False):  # nothing aligns after the export
        return export(ckpt, adapters, chain, out_path, streaming=streaming, lazy=lazy, max_shard_size=max_shard_size)


def _check_run(specs: list[StageSpec], calib: CalibrateOptions | None) -> None:
    calibrated = [s for s in specs if any(need.calibrated for need in s.needs)]
    if calibrated and calib is None:
        s = calibrated[0]
        raise MoePruneError(f"{s.where} needs calibration data: pass --calib NAME=PATH (one per domain).")
    if calib is not None and not calibrated:
        methods = ", ".join(f"{s.options.method!r}" for s in specs)
        kinds = ", ".join(sorted({next(iter(s.needs)).value for s in specs}))
        raise MoePruneError(f"method {methods} is {kinds}-based and ignores --calib; drop --calib or choose a "
                            "calibrated method (e.g. reap, ean_mean, frequency).")
    if calib is not None:
        calib.calib_config()  # the sources exist and the options are sane

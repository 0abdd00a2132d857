"""`moeprune sweep`: UNCURL's per-task reduction sweep, from ONE calibration pass.

For every task d (a `--calib` set) and swept ratio r, with P_d(r) the criterion's uniform plan on d's statistics
only (`select.build.build_plan(stats, criterion, r, calib_set=[d])`, the plan a task pack stores):

    measured(d, ℓ, r) = Σ_t ‖Z_t − MoE_{E∖D}(X_t)‖² / Σ_t ‖Z_t‖²   over d's calibration tokens at MoE layer ℓ,
                        D = the experts P_d(r) drops there (the analysis engine's redundancy probe,
                        `analysis.probe.MeasuredProbe(criterion=...)`, run as the pass's `decide` hook; each layer
                        alone, later layers unpruned)
    quality(d, r)     = ppl(model with P_d(r), d's held-out text) / ppl(original, d's held-out text)
                        (`eval.perplexity.evaluate_sets`; the dropped experts are masked in their routers,
                        `models.masking.masked_experts` — the reference a pruned export equals, see
                        tests/test_sweep.py, which checks it against the exported checkpoint reloaded stock)
    cliff(d, ℓ)       = first swept r with measured(d, ℓ, r) > cliff threshold (`analysis.probe.cliff`)
    knee(d), recommend(d) from quality(d, ·)   (`sweep.knee`)

Outputs (DIR, atomically): sweep.json (every number), sweep.md (tables), sweep.png (curves with the knees, and the
per-layer error heat maps), ratios.json ({task: recommended ratio}, for `moeprune taskpack build --ratios`; tasks
without a recommendation are left out and listed in sweep.json).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moeprune import __version__
from moeprune.analysis.probe import MeasuredProbe, check_ratios, cliff
from moeprune.analysis.run import pass_stats
from moeprune.calibration.data import CalibSet
from moeprune.calibration.run import CalibrateOptions, load_tokenizer, prepare
from moeprune.calibration.session import collect
from moeprune.errors import MoePruneError
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.atomic import check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_experts
from moeprune.select.build import build_plan
from moeprune.sweep.knee import knee
from moeprune.sweep.options import SweepOptions, heldout_sets
from moeprune.sweep.report import write

FORMAT = "moeprune.sweep/1"


def task_drops(stats, criterion: str, ratio: float, task: str) -> dict[int, list[int]]:
    """{MoE layer: dropped experts} of the criterion's plan for one task at one ratio (`build_plan`)."""
    plan = build_plan(stats, criterion, ratio, calib_set=[task])
    return {layer: [e for e in range(plan.num_experts) if e not in set(kept)]
            for layer, kept in plan.kept_experts.items()}


@torch.no_grad()
def sweep_sets(model: torch.nn.Module, adapter: MoEAdapter, sets: list[CalibSet], held: list[CalibSet],
               opts: SweepOptions, calib: CalibrateOptions, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sweep of a loaded model (module docstring); `held[i]` is the held-out text of `sets[i]`."""
    routing = adapter.routing()
    ratios, skipped = check_ratios(opts.ratios, adapter.num_experts, routing)
    for r, why in skipped.items():
        logger.warning("ratio %s is left out of the sweep: %s", r, why)
    probe = MeasuredProbe(ratios, routing, calib.device, opts.probe_tokens, criterion=opts.criterion)
    start = time.perf_counter()
    run = collect(model, adapter, sets, device=calib.device, batch_size=calib.batch_size, decide=probe,
                  probe_stride=calib.probe_stride)
    stats = pass_stats(adapter, run, sets, calib.probe_stride, meta)
    logger.info("calibration pass with the block-error probe done in %.1f s", time.perf_counter() - start)
    model.to(calib.device)
    base = evaluate_sets(model, held, calib.batch_size)
    layers = list(stats.layers)
    tasks: dict[str, Any] = {}
    bar = tqdm(total=len(sets) * len(ratios), desc="held-out perplexity per task and ratio")
    for s, h in zip(sets, held, strict=True):
        ppl, acc, kept = [], [], []
        for i, r in enumerate(ratios):
            drops = task_drops(stats, opts.criterion, r, s.name)
            if [drops[layer] for layer in layers] != [probe.dropped_per_domain[layer][s.name][i] for layer in layers]:
                raise MoePruneError(f"internal: the probe and the plan of {s.name!r} at {r} dropped other experts.")
            with masked_experts(model, adapter, drops):
                score = evaluate_sets(model, [h], calib.batch_size)[h.name]
            ppl.append(score.perplexity)
            acc.append(score.accuracy)
            kept.append([adapter.num_experts - len(drops[layer]) for layer in layers])
            bar.set_postfix_str(f"{s.name} at {r}: x{score.perplexity / base[h.name].perplexity:.3f}")
            bar.update()
        quality = [p / base[h.name].perplexity for p in ppl]
        measured = [probe.measured(layer, s.name) for layer in layers]  # [L][R]
        tasks[s.name] = {
            "heldout": {"source": h.source, "windows": int(h.input_ids.shape[0]), "tokens": base[h.name].tokens,
                        "split": h.source == s.source},
            "calibration_tokens": s.tokens, "perplexity_original": base[h.name].perplexity,
            "accuracy_original": base[h.name].accuracy, "perplexity": ppl, "accuracy": acc, "quality": quality,
            "kept_per_layer": kept, "measured": measured,
            "cliff": [cliff(ratios, m, opts.cliff) for m in measured],
            "dropped": [[probe.dropped_per_domain[layer][s.name][i] for layer in layers] for i in range(len(ratios))],
            **knee(ratios, quality, opts.tolerance).to_dict(),
        }
    bar.close()
    recommended = {name: t["recommend"] for name, t in tasks.items() if t["recommend"] is not None}
    return {
        "format": FORMAT, "moeprune_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_type": adapter.model_type, "num_experts": adapter.num_experts, "top_k": adapter.top_k,
        "criterion": opts.criterion, "policy": "uniform", "ratios": ratios, "skipped_ratios": skipped,
        "tolerance": opts.tolerance, "cliff_threshold": opts.cliff, "probe_tokens": opts.probe_tokens or None,
        "layers": layers, "tasks": tasks, "recommended": recommended,
        "not_recommended": [name for name in tasks if name not in recommended],
        "calibration": {s.name: s.describe() for s in sets}, **(meta or {}),
    }


def sweep(model: str | Path, calib: CalibrateOptions, opts: SweepOptions, out_dir: str | Path, *,
          overwrite: bool = False) -> dict[str, Any]:
    """Checkpoint + calibration text (+ held-out text) -> DIR with the sweep (module docstring). Every refusal
    (options, output folder, ratios this router cannot express, held-out text) comes before the model loads."""
    out = check_output(out_dir, [Path(model)], overwrite)
    opts.heldout_sources(calib)  # every task has held-out text (cheap; checked again on the windows)
    if calib.lazy:
        raise MoePruneError("sweep evaluates the pruned model whole at every ratio; --lazy does not apply. Drop it "
                            "(the model must fit in memory).")
    ckpt = Checkpoint.open(model)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    check_ratios(opts.ratios, adapter.num_experts, adapter.routing())
    ckpt, adapter, sets = prepare(model, calib)
    held = heldout_sets(opts, calib, sets, load_tokenizer(ckpt.path, calib.tokenizer))
    start = time.perf_counter()
    model_obj = load_model(ckpt.path, dtype=calib.dtype)
    adapter = get_adapter(model_obj.config, model=model_obj)
    data = sweep_sets(model_obj, adapter, sets, held, opts, calib, meta={"model": str(ckpt.path)})
    data["wall_s"] = round(time.perf_counter() - start, 2)
    write(data, out)
    return data

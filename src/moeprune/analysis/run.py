"""`moeprune analyze`: the routing analysis to read before pruning, from ONE calibration pass (or a stats file).

    analyze(MODEL, calib, DIR)       calibration pass with routing traces and a measuring `decide` hook, then
                                     usage, balance, specialisation, co-activation, super experts, criteria
                                     agreement, redundancy probe (predicted vs measured) and local routing
                                     consistency (SRP/SCH vs shuffled baseline, verdict)
    analyze_stats(FILE, DIR)         everything a statistics file supports (no traces, no cached activations)
    analyze(..., offload=OffloadOptions(...))   + the offloading simulation on the traces (`moeprune.offload`:
                                     caches per layer, predictors, time per token, verdict) -> "offload", offload.png

DIR gets analysis.json (every number), report.json (`AnalysisResult.sections()`, for the HTML renderer), the PNG
plots, stats.safetensors (model mode: the pass's statistics, ready for `moeprune plan`) and report.html when
`moeprune.analysis.html` is installed. DIR is written atomically; every check that can fail runs first.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeprune import __version__
from moeprune.analysis import plots
from moeprune.analysis.html import render_html
from moeprune.analysis.locality import check_lengths, locality
from moeprune.analysis.offload import plot_offload
from moeprune.analysis.probe import CLIFF, PROBE_TOKENS, MeasuredProbe, check_ratios, cliff, predictions
from moeprune.analysis.results import check_results, results_sections
from moeprune.analysis.sections import build_sections
from moeprune.analysis.usage import balance, coactivation, specialisation, supers, usage
from moeprune.calibration.data import CalibSet
from moeprune.calibration.session import CollectResult, collect
from moeprune.errors import MoePruneError
from moeprune.io.atomic import atomic_dir, check_output
from moeprune.io.checkpoint import Checkpoint
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.models.routing import RoutingSpec
from moeprune.offload.lookahead import Lookahead, both
from moeprune.offload.options import OffloadOptions, check_splittable
from moeprune.offload.run import simulate_offload, split
from moeprune.offload.timing import TimingModel
from moeprune.stats.routed import default_probe_stride
from moeprune.stats.store import ExpertStats, StatsView

FORMAT = "moeprune.analysis/1"
RATIOS = (0.1, 0.25, 0.5, 0.75)
LENGTHS = (4, 16, 64, 256)
NEEDS_MODEL = ("local routing consistency (SRP/SCH) needs per-token routing traces and the measured redundancy "
               "probe needs the MoE blocks' cached inputs and outputs; neither is in a statistics file. Run "
               "`moeprune analyze MODEL --calib NAME=PATH ...` for them.")
PLOTS = {"usage": plots.plot_usage, "balance": plots.plot_balance, "coactivation": plots.plot_coactivation,
         "super_experts": plots.plot_supers, "agreement": plots.plot_agreement, "probe": plots.plot_probe,
         "locality": plots.plot_locality, "offload": plot_offload}


@dataclass
class AnalysisResult:
    data: dict[str, Any]  # analysis.json
    stats: ExpertStats
    traces: dict[str, dict[int, list[torch.Tensor]]] | None = None  # set -> layer -> [T_i, k] per sequence
    out_dir: Path | None = None

    @property
    def images(self) -> dict[str, str]:
        """{section key: PNG file name relative to out_dir} of the plots this analysis has data for."""
        return {key: f"{key}.png" for key in PLOTS if self._plottable(key)}

    def _plottable(self, key: str) -> bool:
        part = self.data.get(key)
        if key == "agreement":
            return any("matrix" in g for g in part or [])
        return isinstance(part, dict) and "skipped" not in part

    def sections(self) -> dict[str, Any]:
        """The report for the HTML renderer: {"title", "subtitle", "sections": [...]} (see analysis.sections)."""
        return build_sections(self.data, self.images)


# ----------------------------------------------------------------------------------------------------- checks


def check_criteria(criteria: Sequence[str] | None) -> list[str] | None:
    """Criterion names for the agreement matrix; only those a statistics file can score."""
    if criteria is None:
        return None
    from moeprune.criteria import CRITERIA

    names = list(dict.fromkeys(criteria))
    for name in names:
        if CRITERIA.get(name).needs not in ("calibration", "none"):
            raise MoePruneError(f"criterion {name!r} scores weights, not routing statistics; the agreement matrix "
                                "compares calibrated criteria (and random). Drop it from --criteria.")
    return names


# ----------------------------------------------------------------------------------------------- the pieces


def agreement_at(stats: ExpertStats, ratios: list[float], criteria: list[str] | None) -> list[dict[str, Any]]:
    """Kept-set overlap matrices (criteria/agreement.py) at every ratio, restricted to `criteria` (+ random)."""
    from moeprune.criteria.agreement import agreement

    out = []
    for r in ratios:
        try:
            ag = agreement(stats, r)
        except MoePruneError as e:
            out.append({"ratio": r, "skipped": str(e)})
            continue
        keep = [i for i, m in enumerate(ag.methods) if criteria is None or m in criteria or m == "random"]
        out.append({"ratio": r, "methods": [ag.methods[i] for i in keep],
                    "matrix": ag.matrix[keep][:, keep].tolist(),
                    "per_layer": [ag.per_layer[layer][keep][:, keep].tolist() for layer in stats.layers]})
    return out


def stats_analysis(stats: ExpertStats, ratios: Sequence[float], criteria: list[str] | None) -> dict[str, Any]:
    """Every part a statistics file supports; the probe holds predictions only."""
    routing = StatsView(stats).routing()
    usable, skipped = check_ratios(ratios, stats.num_experts, routing)
    pred = predictions(stats.sets, stats.combined(), stats.layers, usable, routing)
    if skipped:
        pred["skipped_ratios"] = skipped
    return {
        "format": FORMAT, "moeprune_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_type": stats.model_type, "num_experts": stats.num_experts, "top_k": stats.top_k,
        "routing": dataclasses.asdict(routing), "layers": list(stats.layers), "domains": list(stats.sets),
        "tokens": {name: stats.tokens(name) for name in stats.sets},
        "calibration": stats.meta.get("calibration", {}), "ratios": [float(r) for r in sorted(set(ratios))],
        "usage": usage(stats), "balance": balance(stats), "specialisation": specialisation(stats),
        "coactivation": coactivation(stats), "super_experts": supers(stats),
        "agreement": agreement_at(stats, usable, criteria), "probe": pred, "notes": [],
    }


def add_measured(data: dict[str, Any], probe: MeasuredProbe, threshold: float) -> None:
    """Measured errors ([L][R], overall and per domain) and the cliff of every layer into data["probe"]."""
    p, layers = data["probe"], data["layers"]
    p["measured"] = [probe.measured(layer) for layer in layers]
    p["measured_per_domain"] = {d: [probe.measured(layer, d) for layer in layers] for d in data["domains"]}
    p["cliff_threshold"] = threshold
    p["probe_tokens"] = probe.max_tokens or None  # per domain and layer; None: every real token
    p["cliff"] = [cliff(p["ratios"], m, threshold) for m in p["measured"]]
    assert [probe.dropped[layer] for layer in layers] == p["dropped"], "probe and prediction chose other experts"


# ----------------------------------------------------------------------------------------------- entry points


def pass_stats(adapter: MoEAdapter, run: CollectResult, sets: list[CalibSet], probe_stride: int | None,
               meta: dict[str, Any] | None) -> ExpertStats:
    """The `ExpertStats` of one single-process calibration pass (`collect`) over `sets`."""
    return ExpertStats(
        adapter.model_type, adapter.num_experts, adapter.top_k, adapter.moe_layers(), run.router_sha256, run.stats,
        {"routing": dataclasses.asdict(adapter.routing()), "moeprune_version": __version__, "world_size": 1,
         "probe_stride": probe_stride or default_probe_stride(adapter.num_experts, adapter.top_k),
         "calibration": {s.name: [s.describe()] for s in sets}, **(meta or {})})


def analyze_sets(model: torch.nn.Module, adapter: MoEAdapter, sets: list[CalibSet], *,
                 ratios: Sequence[float] = RATIOS, lengths: Sequence[int] = LENGTHS,
                 criteria: Sequence[str] | None = None, cliff_threshold: float = CLIFF, device: str = "cpu",
                 batch_size: int = 8, layer_context=None, probe_stride: int | None = None,
                 meta: dict[str, Any] | None = None, probe_tokens: int | None = PROBE_TOKENS,
                 offload: OffloadOptions | None = None, timing: TimingModel | None = None,
                 heldout: list[CalibSet] | None = None) -> AnalysisResult:
    """One calibration pass of a loaded model over `sets` with traces and the measured probe; nothing written.
    With `offload` (and its `timing`): the offloading simulation, trained on these traces and run on the traces of
    one more pass over `heldout` (the same `collect`), or on the odd-numbered calibration sequences without it."""
    if offload is not None:
        if timing is None:
            raise MoePruneError("the offloading simulation needs a timing model (TimingModel.from_checkpoint).")
        offload.check(adapter.top_k, adapter.num_experts)
        if not heldout:
            check_splittable([s.name for s in sets], [int(s.input_ids.shape[0]) for s in sets])
    routing: RoutingSpec = adapter.routing()
    usable, _ = check_ratios(ratios, adapter.num_experts, routing)
    lengths, criteria = check_lengths(lengths), check_criteria(criteria)
    probe = MeasuredProbe(usable, routing, device, probe_tokens)
    start = time.perf_counter()
    look = Lookahead(device) if offload is not None else None  # router look-ahead guesses for the prefetcher
    run = collect(model, adapter, sets, device=device, batch_size=batch_size, layer_context=layer_context,
                  decide=probe if look is None or heldout else both(probe, look), probe_stride=probe_stride,
                  trace=True)
    stats = pass_stats(adapter, run, sets, probe_stride, meta)
    logger.info("calibration pass done in %.1f s; computing the analysis", time.perf_counter() - start)
    data = stats_analysis(stats, ratios, criteria)
    add_measured(data, probe, cliff_threshold)
    combined = stats.combined()
    data["locality"] = locality(run.traces, {layer: combined[layer].sums["count"] for layer in stats.layers},
                                stats.layers, adapter.num_experts, adapter.top_k, lengths)
    data["source"] = {"model": (meta or {}).get("model"), "stats_file": None}
    if offload is not None:
        if heldout:
            test = collect(model, adapter, heldout, device=device, batch_size=batch_size, layer_context=layer_context,
                           decide=look, probe_stride=probe_stride, trace=True).traces
            train, which, guesses = run.traces, "heldout", look.traces
        else:
            (train, test), which, guesses = split(run.traces), "split", split(look.traces)[1]
        data["offload"] = simulate_offload(train, test, stats.layers, adapter.num_experts, adapter.top_k, timing,
                                           offload, which, lookahead=guesses)
    return AnalysisResult(data, stats, run.traces)


def analyze(model: str | Path, calib, out_dir: str | Path, *, ratios: Sequence[float] = RATIOS,
            lengths: Sequence[int] = LENGTHS, criteria: Sequence[str] | None = None, cliff_threshold: float = CLIFF,
            overwrite: bool = False, results: Sequence[str | Path] = (),
            probe_tokens: int | None = PROBE_TOKENS, offload: OffloadOptions | None = None) -> AnalysisResult:
    """Checkpoint + `CalibrateOptions` -> DIR with the analysis (module docstring); `offload` adds the offloading
    simulation (`moeprune.offload`). Refusals come first."""
    from moeprune.calibration import run as calib_run
    from moeprune.calibration.distributed import current_rank
    from moeprune.models import get_adapter

    out = check_output(out_dir, [Path(model)], overwrite)
    results = check_results(list(results))
    check_ratios(ratios)
    check_lengths(lengths)
    check_criteria(criteria)
    _check_cliff(cliff_threshold)
    if probe_tokens is not None and (isinstance(probe_tokens, bool) or not isinstance(probe_tokens, int)
                                     or probe_tokens < 0):
        raise MoePruneError(f"--probe-tokens {probe_tokens!r}: give a number of tokens >= 1, or 0 for every token.")
    if current_rank().world > 1:
        raise MoePruneError("analyze measures the probe in one process; run it without torchrun.")
    ckpt = Checkpoint.open(model)  # config only: the ratios this router can express, before any tokenising
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    check_ratios(ratios, adapter.num_experts, adapter.routing())
    timing, heldout = None, None
    if offload is not None:
        offload.check(adapter.top_k, adapter.num_experts)
        timing = TimingModel.from_checkpoint(model, offload.bandwidth, offload.tflops)
        if offload.heldout:
            heldout = calib_run.prepare(model, dataclasses.replace(calib, calib=tuple(offload.heldout),
                                                                   held_out=0))[2]
    ckpt, adapter, sets = calib_run.prepare(model, calib)
    if offload is not None and heldout is None:
        check_splittable([s.name for s in sets], [int(s.input_ids.shape[0]) for s in sets])
    start = time.perf_counter()
    model_obj, layer_context = calib_run._load(ckpt, calib)
    adapter = get_adapter(model_obj.config, model=model_obj)
    result = analyze_sets(model_obj, adapter, sets, ratios=ratios, lengths=lengths, criteria=criteria,
                          cliff_threshold=cliff_threshold, device=calib.device, batch_size=calib.batch_size,
                          layer_context=layer_context, probe_stride=calib.probe_stride,
                          meta={"model": str(ckpt.path)}, probe_tokens=probe_tokens, offload=offload,
                          timing=timing, heldout=heldout)
    result.data["wall_s"] = round(time.perf_counter() - start, 2)
    write(result, out, stats_file=True, results=results)
    return result


def analyze_stats(stats_file: str | Path, out_dir: str | Path, *, ratios: Sequence[float] = RATIOS,
                  criteria: Sequence[str] | None = None, overwrite: bool = False,
                  results: Sequence[str | Path] = ()) -> AnalysisResult:
    """Statistics file -> DIR with every part it supports, and a note on what needs the model."""
    out = check_output(out_dir, [Path(stats_file)], overwrite)
    results = check_results(list(results))
    check_ratios(ratios)
    criteria = check_criteria(criteria)
    stats = ExpertStats.load(stats_file)
    data = stats_analysis(stats, ratios, criteria)
    data["probe"]["measured_skipped"] = NEEDS_MODEL
    data["locality"] = {"skipped": NEEDS_MODEL}
    data["notes"].append(NEEDS_MODEL)
    data["source"] = {"model": stats.meta.get("model"), "stats_file": str(Path(stats_file).resolve())}
    result = AnalysisResult(data, stats)
    write(result, out, stats_file=False, results=results)
    return result


def _check_cliff(threshold: float) -> None:
    if not 0.0 < float(threshold) < 1.0:
        raise MoePruneError(f"--cliff {threshold}: the cliff is a relative output error strictly between 0 and 1 "
                            "(default 0.1).")


# ----------------------------------------------------------------------------------------------- writing


def write(result: AnalysisResult, out: Path, *, stats_file: bool, results: Sequence[Path] = ()) -> Path:
    """analysis.json, report.json, report.html, PNGs (+ stats.safetensors), atomically; `results`: prune / merge /
    compare folders whose outcome the report shows after the analysis (`analysis/results.py`)."""
    with atomic_dir(out) as tmp:
        for key, name in result.images.items():
            PLOTS[key](result.data, tmp / name)
        result.data["files"] = dict(result.images)
        if stats_file:
            result.stats.save(tmp / "stats.safetensors")
            result.data["files"]["stats"] = "stats.safetensors"
        report = result.sections()
        if results:
            report["results"] = results_sections(list(results), tmp)
        (tmp / "analysis.json").write_text(json.dumps(result.data, indent=1, allow_nan=False))
        (tmp / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        render_html(report, tmp)
    result.out_dir = out
    logger.info("analysis written to %s (%s)", out, ", ".join(sorted(p.name for p in out.iterdir())))
    return out

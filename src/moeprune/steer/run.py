"""`moeprune steer MODEL --with NAME=PATH --without NAME=PATH --out plan.json`: find a behaviour's experts (MoTE).

Order of work (every check that can fail runs before the model is loaded): output file, options, sets on both
sides with distinct names, checkpoint and adapter, tokenizer, every set read and tokenised. Then the model is
loaded once, calibrated on all sets (`calibration.run.calibrate_model`, the statistics `moeprune calibrate`
writes), the fTRI contrast (`steer.contrast`) ranks the experts, the top N become the plan, and the plan's effect
is measured on the calibration text held apart from the scored windows (`--held-out`): per set, perplexity without
and with the plan (ratio = steered / original). The plan and its contrast table and effect go to one JSON file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from moeprune.calibration.data import CalibSource
from moeprune.calibration.run import CalibrateOptions, calibrate_model, prepare
from moeprune.errors import MoePruneError
from moeprune.eval.perplexity import evaluate_sets
from moeprune.io.load import load_model
from moeprune.log import logger
from moeprune.pipeline.quality import held_apart
from moeprune.stats.store import ExpertStats
from moeprune.steer.apply import steering
from moeprune.steer.contrast import ftri_contrast, top_experts
from moeprune.steer.plan import ACTIONS, DEFAULT_STRENGTH, SteerEntry, SteerPlan

FORMULA = ("f = count / tokens, m = gate_sum / tokens per side; Δf = f_with − f_without, Δm likewise; "
           "z = Δf / sqrt(p(1−p)(1/n_with + 1/n_without)), p = pooled frequency; ranked by Δf among z >= min_z")


@dataclass(frozen=True)
class SteerOptions:
    with_: tuple[str, ...]  # NAME=PATH: text with the behaviour
    without: tuple[str, ...]  # NAME=PATH: matched text without it
    top: int = 10
    action: str = "off"
    strength: float | None = None  # action "on": added to the router score (default DEFAULT_STRENGTH)
    min_z: float = 3.0
    calib: CalibrateOptions = dataclasses.field(default_factory=lambda: CalibrateOptions(()))
    measure: bool = True  # measure the plan's effect on the held-apart windows

    def __post_init__(self) -> None:
        if not self.with_ or not self.without:
            raise MoePruneError("steer needs text on both sides: --with NAME=PATH (the behaviour) and --without "
                                "NAME=PATH (matched text without it), each repeatable.")
        if self.top < 1:
            raise MoePruneError(f"--top must be >= 1, got {self.top}.")
        if self.action not in ACTIONS:
            raise MoePruneError(f"--action must be one of {', '.join(ACTIONS)}, got {self.action!r}.")
        if self.strength is not None and self.action != "on":
            raise MoePruneError("--strength is the score added to experts forced on; it needs --action on.")
        if self.strength is not None and not self.strength > 0:
            raise MoePruneError(f"--strength must be > 0, got {self.strength}.")
        names = [CalibSource.parse(s, flag="--with").name for s in self.with_] + \
                [CalibSource.parse(s, flag="--without").name for s in self.without]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MoePruneError(f"set name(s) {dup} are used twice; give every --with / --without set its own NAME.")

    def names(self) -> tuple[list[str], list[str]]:
        return ([CalibSource.parse(s).name for s in self.with_], [CalibSource.parse(s).name for s in self.without])

    def calibrate_options(self) -> CalibrateOptions:
        return dataclasses.replace(self.calib, calib=tuple(self.with_) + tuple(self.without))


def plan_from_stats(stats: ExpertStats, with_sets: list[str], without_sets: list[str], *, top: int = 10,
                    action: str = "off", strength: float | None = None, min_z: float = 3.0) -> SteerPlan:
    """The steering plan of the `top` experts of the fTRI contrast of `stats` (no model needed)."""
    contrast = ftri_contrast(stats, with_sets, without_sets)
    chosen = top_experts(contrast, top, min_z)
    if len(chosen) < top:
        logger.warning("only %d experts route more often with the behaviour at z >= %g (asked for %d)",
                       len(chosen), min_z, top)
    if action == "on" and strength is None:
        strength = DEFAULT_STRENGTH
    entries = tuple(SteerEntry(c.layer, c.expert, action, strength if action == "on" else None) for c in chosen)
    ranked = sorted(contrast, key=lambda c: (-c.d_freq, c.layer, c.expert))
    info = {"with": with_sets, "without": without_sets, "min_z": min_z, "formula": FORMULA,
            "tokens_with": sum(stats.tokens(n) for n in with_sets),
            "tokens_without": sum(stats.tokens(n) for n in without_sets)}
    return SteerPlan(stats.model_type, stats.num_experts, stats.top_k, stats.meta.get("routing", {}).get("kind", "?"),
                     tuple(stats.layers), entries, stats.router_sha256, info, [c.to_dict() for c in ranked])


def measure_effect(model, plan: SteerPlan, sets, batch_size: int = 8) -> dict:
    """{"sets": {name: {perplexity_before, perplexity_after, ratio, windows}}, "note"} on each set's held-apart
    windows: the model as it is, then with the plan applied."""
    apart = held_apart(sets)
    if not apart:
        return {"sets": {}, "note": "no calibration text held apart (--held-out 0 or too little text): not measured"}
    before = evaluate_sets(model, apart, batch_size)
    with steering(model, plan):
        after = evaluate_sets(model, apart, batch_size)
    return {"note": "perplexity on calibration text held apart from the scored windows, without / with the plan",
            "sets": {s.name: {"perplexity_before": before[s.name].perplexity,
                              "perplexity_after": after[s.name].perplexity,
                              "ratio": after[s.name].perplexity / before[s.name].perplexity,
                              "windows": int(s.input_ids.shape[0])} for s in apart}}


def steer(model: str | Path, opts: SteerOptions, out: str | Path | None = None, *, overwrite: bool = False
          ) -> SteerPlan:
    """Calibrate both sides, contrast, plan, measure; write the plan to `out` when given."""
    from moeprune.io.atomic import check_output_file

    out_path = check_output_file(out, ".json", overwrite) if out is not None else None
    copts = opts.calibrate_options()
    ckpt, _, sets = prepare(model, copts)
    with_sets, without_sets = opts.names()
    model_obj = load_model(ckpt.path, dtype=copts.dtype)
    stats = calibrate_model(model_obj, sets, copts, source=ckpt.path)
    plan = plan_from_stats(stats, with_sets, without_sets, top=opts.top, action=opts.action, strength=opts.strength,
                           min_z=opts.min_z)
    if opts.measure and plan.steer:
        plan = dataclasses.replace(plan, effect=measure_effect(model_obj, plan, sets, copts.batch_size))
    if out_path is not None:
        plan.save(out_path)
        logger.info("steering plan written to %s", out_path)
    return plan


def format_plan(plan: SteerPlan, rows: int | None = None) -> str:
    """The chosen experts with their contrast, and the measured effect."""
    info = {(r["layer"], r["expert"]): r for r in plan.experts or []}
    lines = [f"{'layer':>5} {'expert':>6} {'action':>6} {'f with':>7} {'f w/o':>7} {'Δf':>7} {'Δ gate':>7} {'z':>7}"]
    for e in plan.steer[:rows]:
        r = info.get((e.layer, e.expert))
        stats = (f"{r['freq_with']:7.3f} {r['freq_without']:7.3f} {r['d_freq']:+7.3f} {r['d_mass']:+7.3f} "
                 f"{r['z']:7.1f}") if r else ""
        lines.append(f"{e.layer:>5} {e.expert:>6} {e.action + (f' +{e.strength:g}' if e.action == 'on' else ''):>6} "
                     + stats)
    if plan.effect is not None and not plan.effect.get("sets"):
        lines.append(f"effect: {plan.effect.get('note')}")
    for name, s in ((plan.effect or {}).get("sets") or {}).items():
        lines.append(f"effect on {name}: perplexity {s['perplexity_before']:.3f} -> {s['perplexity_after']:.3f} "
                     f"(x{s['ratio']:.3f}, {s['windows']} held-apart windows)")
    return "\n".join(lines)

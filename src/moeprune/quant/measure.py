"""`moeprune budget … --measure N`: the top N predicted recipes run for real and scored on held-out text.

    for each of the N recipes:  export = api.prune(MODEL, <temporary folder>, recipe, calib)   (the pipeline)
                                ppl_d  = moeprune.eval.evaluate(export, eval options)           (per domain d)
    measured ratio = mean_d ppl_d(recipe) / ppl_d(original)       next to the predicted loss of the same recipe
A recipe with no stage (the original itself fits) is the original: ratio 1. The exports live in a temporary folder
and are deleted after scoring; the bytes each one wrote are kept.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from moeprune.calibration.run import CalibrateOptions
from moeprune.errors import MoePruneError
from moeprune.eval.run import EvalOptions, evaluate
from moeprune.log import logger


@dataclass
class Measured:
    recipe: dict
    predicted_loss: float
    predicted_bytes: int
    bytes_written: int
    perplexity: dict[str, float]  # per held-out domain
    ratio: float  # mean over domains of perplexity / the original's


def check_measure(n: int, calib: CalibrateOptions | None) -> None:
    """Before any work: N a non-negative integer, and calibration text for the recipes' calibrated stages."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MoePruneError(f"--measure takes the number of recipes to run, got {n!r}.")
    if n and calib is None:
        raise MoePruneError("--measure runs the printed recipes, whose expert and neuron removal calibrate on text: "
                            "give --calib NAME=PATH (the same text the statistics came from).")


def _needs_calib(recipe: dict) -> bool:
    from moeprune.pipeline.recipe import parse_recipe

    return any(need.calibrated for spec in parse_recipe(recipe, "budget recipe") for need in spec.needs)


def _scores(path: str | Path, opts: EvalOptions) -> dict[str, float]:
    return {name: s.perplexity for name, s in evaluate(path, opts).scores.items()}


def measure(model: str | Path, recipes: list[dict], predicted: list[tuple[float, int]], calib: CalibrateOptions,
            eval_opts: EvalOptions) -> tuple[dict[str, float], list[Measured]]:
    """(the original's held-out perplexity per domain, each recipe measured) — see the module docstring."""
    from moeprune.pipeline.run import prune

    original = _scores(model, eval_opts)
    out = []
    for n, (recipe, (loss, nbytes)) in enumerate(zip(recipes, predicted, strict=True), 1):
        logger.info("measuring recipe %d/%d", n, len(recipes))
        if not recipe["stages"]:
            out.append(Measured(recipe, loss, nbytes, nbytes, dict(original), 1.0))
            continue
        with tempfile.TemporaryDirectory(prefix="moeprune-measure-") as tmp:
            applied, _ = prune(model, Path(tmp) / "export", recipe, source="budget recipe",
                               calib=calib if _needs_calib(recipe) else None, run_verify=False)
            ppl = _scores(applied.out, eval_opts)
            written = applied.report["weight_bytes_after"]
        ratio = sum(ppl[d] / original[d] for d in original) / len(original)
        out.append(Measured(recipe, loss, nbytes, written, ppl, ratio))
    return original, out

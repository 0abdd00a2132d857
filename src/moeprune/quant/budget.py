"""`moeprune budget MODEL STATS --bytes X | --ratio-of-original R`: the recipes of least predicted loss at a size.

Order of work: options, checkpoint headers (sizes; a quantized input is refused), statistics file (must be this
model's), the target and the smallest model of the grid (a budget below it is refused here, before any weight is
read), the fake quantizer, the calibration text for camera; then the work: expert weights one decoder layer at a
time (quantization errors per micro-expert and width), neuron statistics (camera only), the search
(quant/search.py, which documents the prediction and its assumptions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from moeprune.criteria import CRITERIA
from moeprune.criteria.neurons import NEURON_CRITERIA
from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.quant.allocate import GRANULARITIES, check_widths
from moeprune.quant.importance import IMPORTANCE, FakeQuant, ImportanceInputs, micro_errors, omegas, rtn_fake_quant
from moeprune.quant.model_sizes import ModelSizes, model_sizes
from moeprune.quant.search import Candidate, axes, search, smallest_bytes
from moeprune.quant.sizes import MAX_PACKED, MIN_PACKED, STORED, PackedFormat
from moeprune.stats.store import ExpertStats, StatsView

EXPERT_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
NEURON_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5)


@dataclass(frozen=True)
class BudgetOptions:
    """Typed options of `moeprune budget`; exactly one of `bytes` and `ratio_of_original`."""

    bytes: int | None = None
    ratio_of_original: float | None = None
    importance: str = "pmq"
    criterion: str = "frequency"  # expert removal in the recipes (a calibrated criterion)
    neuron_method: str = "camera"  # neuron removal in the recipes
    widths: tuple[int, ...] = (2, 3, 4, 8)  # quantized widths; the unquantized recipes are always in the grid
    group_size: int = 128
    symmetric: bool = True
    granularity: str = "layer"
    expert_ratios: tuple[float, ...] = EXPERT_RATIOS
    neuron_ratios: tuple[float, ...] = NEURON_RATIOS
    top: int = 3
    rho: float = 0.9
    calib_set: tuple[str, ...] | None = None
    measure: int = 0  # run the top N recipes for real (quant/measure.py); the search returns max(top, N)

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.ratio_of_original is None):
            raise MoePruneError("give the size as exactly one of --bytes (e.g. 40GB) or --ratio-of-original "
                                "(e.g. 0.3).")
        if self.bytes is not None and (isinstance(self.bytes, bool) or not isinstance(self.bytes, int)
                                       or self.bytes <= 0):
            raise MoePruneError(f"--bytes must be a positive size, got {self.bytes!r}.")
        r = self.ratio_of_original
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1):
            raise MoePruneError(f"--ratio-of-original must lie in (0, 1], got {r!r}.")
        IMPORTANCE.get(self.importance)
        crit = CRITERIA.get(self.criterion)
        if crit.needs != "calibration":
            raise MoePruneError(f"--criterion {self.criterion}: budget predicts from statistics; choose a calibrated "
                                f"criterion ({', '.join(n for n, c in CRITERIA.items() if c.needs == 'calibration')})"
                                ".")
        NEURON_CRITERIA.get(self.neuron_method)
        if any(b >= STORED for b in check_widths(self.widths)):
            raise MoePruneError(f"--widths {self.widths}: give quantized widths ({MIN_PACKED}..{MAX_PACKED}); recipes "
                                "that leave the experts unquantized are always in the search.")
        PackedFormat(self.group_size, self.symmetric)
        GRANULARITIES.get(self.granularity)
        for name in ("expert_ratios", "neuron_ratios"):
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1
                   for v in getattr(self, name)):
                raise MoePruneError(f"--{name.replace('_', '-')}: fractions in [0, 1), got {getattr(self, name)}.")
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 1:
            raise MoePruneError(f"--top must be a positive integer, got {self.top!r}.")
        if not 0 <= self.rho <= 1:
            raise MoePruneError(f"--rho must lie in [0, 1], got {self.rho!r}.")
        if isinstance(self.measure, bool) or not isinstance(self.measure, int) or self.measure < 0:
            raise MoePruneError(f"--measure takes the number of recipes to run, got {self.measure!r}.")

    def target(self, sizes: ModelSizes) -> int:
        return self.bytes if self.bytes is not None else math.floor(self.ratio_of_original * sizes.total)


@dataclass
class BudgetResult:
    target: int
    original: int
    candidates: list[Candidate]  # best first
    options: BudgetOptions

    def recipes(self) -> list[dict]:
        o = self.options
        return [c.recipe(o.criterion, o.neuron_method, o.group_size, o.symmetric) for c in self.candidates]


def budget(model: str | Path, stats: str | Path, opts: BudgetOptions, *, calib=None,
           fake_quant: FakeQuant | None = None) -> BudgetResult:
    """The `opts.top` recipes of least predicted loss at the size `opts` gives. `calib` (CalibrateOptions):
    calibration text for importance camera; `fake_quant`: (W, bits) -> Ŵ (default: the quantize stage's RTN)."""
    sizes, adapter, ckpt = model_sizes(model)
    st = ExpertStats.load(stats)
    _check_stats(st, adapter, stats)
    routing = StatsView(st).routing()
    target = opts.target(sizes)
    ax = axes(opts.expert_ratios, opts.neuron_ratios, sizes, routing, opts.group_size)
    fmt = PackedFormat(opts.group_size, opts.symmetric, scale_bytes=sizes.expert.stored_bytes)
    for what, n in (("hidden size", sizes.expert.hidden), ("expert width", sizes.expert.width)):
        if n % opts.group_size:
            raise MoePruneError(f"--group-size {opts.group_size} does not divide the {what} {n}; the quantize stage "
                                "needs groups that divide every expert matrix's input features.")
    widths = tuple(sorted(set(opts.widths)))
    least = smallest_bytes(sizes, ax, widths, fmt)
    if least > target:
        raise MoePruneError(f"{target:,} bytes is below the smallest model the search can make ({least:,} bytes: "
                            f"{max(r for r, _ in ax.experts):g} of the experts removed, "
                            f"{max(v for v, _ in ax.neurons):g} of their neurons, {widths[0]} bits; the original "
                            f"is {sizes.total:,} bytes). Raise the budget or widen the grid.")
    if IMPORTANCE.get(opts.importance).needs == "neurons" and calib is None:
        raise MoePruneError(f"importance {opts.importance!r} needs neuron statistics: give calibration text "
                            "(--calib NAME=PATH), or choose --importance pmq (the statistics file suffices).")
    fake_quant = fake_quant or rtn_fake_quant(opts.group_size, opts.symmetric)
    sets = _calib_sets(ckpt, calib) if calib is not None else None
    errors, neurons = _weights_pass(ckpt.path, adapter, widths, fake_quant, sets, calib)
    inputs = ImportanceInputs(errors, routed=st.combined(list(opts.calib_set) if opts.calib_set else None),
                              neurons=neurons, rho=opts.rho)
    omega = omegas(opts.importance, inputs)
    crit = CRITERIA.get(opts.criterion)
    scores = {layer: crit.fn(s) for layer, s in inputs.routed.items()}
    found = search(sizes, ax, target, scores, crit.higher_keeps, routing, errors, omega, fmt, opts.granularity)
    logger.info("budget %s bytes (%.3f of the original %s): %d of %d grid points fit", f"{target:,}",
                target / sizes.total, f"{sizes.total:,}", len(found), len(ax.experts) * len(ax.neurons))
    return BudgetResult(target, sizes.total, found[:max(opts.top, opts.measure)], opts)


def _check_stats(st: ExpertStats, adapter, path) -> None:
    for key, mine in (("model_type", adapter.model_type), ("num_experts", adapter.num_experts),
                      ("layers", adapter.moe_layers())):
        if getattr(st, key) != mine:
            raise MoePruneError(f"{path}: statistics of another model ({key} {getattr(st, key)!r}, the model has "
                                f"{mine!r}); calibrate this model with `moeprune calibrate`.")


def _calib_sets(ckpt, calib):
    from moeprune.calibration.data import build_sets
    from moeprune.calibration.run import load_tokenizer

    return build_sets(calib.calib_config(), load_tokenizer(ckpt.path, calib.tokenizer))


def _weights_pass(path: Path, adapter, widths, fake_quant, sets, calib):
    """Micro-expert errors of every MoE layer (one decoder layer in memory at a time), and neuron statistics when
    calibration sets are given (whole model, as the neuron stage collects them)."""
    if sets is not None:
        from moeprune.io.load import load_model
        from moeprune.models import get_adapter
        from moeprune.quant.importance import model_errors
        from moeprune.stats.neurons import collect_neuron_stats

        model = load_model(path, dtype=calib.dtype)
        adapter = get_adapter(model.config, model=model)
        neurons = collect_neuron_stats(model, adapter, sets, gradients=False, batch_size=calib.batch_size)
        return model_errors(model, adapter, widths, fake_quant), neurons
    from moeprune.io.lazy import load_lazy
    from moeprune.models import get_adapter

    lazy = load_lazy(path)
    adapter = get_adapter(lazy.model.config, model=lazy.model)
    layers, errors = adapter.moe_layers(), {}
    for n, layer in enumerate(bar := tqdm(layers, leave=False)):
        bar.set_description(f"quantization errors (layer {n + 1}/{len(layers)})")
        with lazy.layer(layer):
            errors[layer] = micro_errors(adapter.expert_roles(adapter.block(lazy.model, layer)), widths, fake_quant)
    return errors, None

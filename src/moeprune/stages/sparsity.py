"""Unstructured / N:M sparsity inside the routed experts as a stage: `{method: wanda, sparsity: 0.5,
pattern: unstructured|2:4, owl: true}` (`prune --method wanda --sparsity 0.5 [--pattern 2:4] [--owl]`).

    stats  = one instrumented pass (`stats/neurons.py`): per expert j, in_sq[j] [H] over its routed tokens' inputs
             (gate, up) and act_sq[j] [I] over its activations (down)
    scores = Wanda |W|·‖X‖ per role of every expert (`sparsity/wanda.py`)
    s_ℓ    = the sparsity, or OWL's per-layer sparsities around it (outlier ratio of layer ℓ's scores)
    plan   = a WeightsPlan ("wanda", `masks`) holding the keep mask of gate, up and down of every expert, packed
             as bits (`sparsity/keep_bits.py`; biases untouched); applied as W ← W ⊙ keep

Only routed experts are sparsified (shared experts, attention and routers are left dense). The export is the dense
checkpoint with zeros (stock-loadable, every shape and config key unchanged); the report states the zero fraction
per tensor. `verify` compares with the original whose same weights are zeroed (the weights-stage reference).
The statistics pass runs one decoder layer at a time (`stats/neurons_layered.py`) and each layer is masked as soon as
its sums are complete, while its weights are in memory (OWL: its outlier ratio then, its masks in a second visit
once every ratio is known). With `--lazy` (or a checkpoint larger than memory) the layers are read from disk in
turn and the packed masks wait on disk (`stages/weights_store.py`), so memory holds about one layer. The plan is
1/16 of the experts' bf16 bytes; plans of the masked values (format moeprune.wanda/1) are still read.
`sparsity` is the fraction of routed-expert weights zeroed (biases not counted); 2:4 is exactly one half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.io.memory import COMPUTE_REUSE, reuse_freed_memory
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.sparsity.keep_bits import pack
from moeprune.sparsity.wanda import PATTERNS, outlier_count, owl_sparsities, score_mass, wanda_mask
from moeprune.stages.base import Need, register_stage
from moeprune.stages.weights import WeightOptions, WeightStage
from moeprune.stages.weights_plan import WeightsPlan, weights_format
from moeprune.stages.weights_store import SpilledLayers, layer_sink

OWL_M, OWL_LAMBDA = 5.0, 0.08  # OWL's defaults (its paper's M and λ for LLaMA)
ROLE_INPUT = {"gate": "in_sq", "up": "in_sq", "down": "act_sq"}  # which input norms each role's columns see


@dataclass(frozen=True)
class SparsityOptions(WeightOptions):
    sparsity: float | None = None  # fraction of routed-expert weights zeroed (default 0.5; 2:4 is 0.5)
    pattern: str = "unstructured"
    owl: bool | None = None  # per-layer sparsities from the outlier ratios (unstructured only)
    owl_m: float | None = None  # OWL's M (default 5)
    owl_lambda: float | None = None  # OWL's λ: the layer sparsities span 2λ (default 0.08)


class SparsityStage(WeightStage):
    kind = "sparsity"
    plan_format = weights_format("wanda", masks=True)
    reads_formats = (weights_format("wanda"),)  # plans that held the masked values
    options_type = SparsityOptions

    @classmethod
    def methods(cls) -> list[str]:
        return ["wanda"]

    def validate_options(self, o: SparsityOptions) -> None:
        if o.pattern not in PATTERNS:
            raise MoePruneError(f"pattern {o.pattern!r}: choose {' or '.join(PATTERNS)}.")
        s = o.sparsity
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1):
            raise MoePruneError(f"sparsity {s!r}: a fraction of the routed-expert weights, 0 < sparsity < 1.")
        if o.pattern == "2:4" and s is not None and s != 0.5:
            raise MoePruneError(f"pattern 2:4 keeps 2 of every 4 weights: its sparsity is 0.5, not {s}; drop "
                                "--sparsity or use pattern unstructured.")
        if o.pattern == "2:4" and o.owl:
            raise MoePruneError("OWL varies the sparsity per layer, but 2:4 fixes it at one half; drop --owl.")
        given = [n for n in ("owl_m", "owl_lambda") if getattr(o, n) is not None]
        if given and not o.owl:
            raise MoePruneError(f"{', '.join('--' + n.replace('_', '-') for n in given)} set up OWL; add --owl "
                                "(owl: true) or drop them.")
        lam = OWL_LAMBDA if o.owl_lambda is None else o.owl_lambda
        target = 0.5 if s is None else s
        if o.owl and not 0 <= 2 * lam < min(target, 1 - target):  # a layer may lie up to 2λ from the target
            raise MoePruneError(f"owl_lambda {lam}: OWL's layer sparsities span 2λ around their mean {target}, so one "
                                f"can lie up to 2λ from it, and each must stay inside (0, 1); choose 0 <= λ < "
                                f"{min(target, 1 - target) / 2:.3f}.")
        if o.owl_m is not None and not o.owl_m > 1:
            raise MoePruneError(f"owl_m {o.owl_m}: an outlier is a score above M × the mean; choose M > 1.")

    def plans_per_layer(self, o: SparsityOptions) -> bool:
        return True  # a layer's masks are final once its statistics are (with OWL: in its second visit)

    def needs(self, o: SparsityOptions) -> set[Need]:
        return {Need.NEURONS}

    def check(self, o: SparsityOptions, adapter: MoEAdapter) -> Any:
        from moeprune.models.capabilities import require

        require(adapter, "neurons")
        if o.pattern == "2:4":
            H, width = int(adapter.config.hidden_size), adapter.expert_width
            if H % 4 or (width or 0) % 4:
                raise MoePruneError(f"2:4 groups 4 consecutive inputs: hidden size {H} and expert width {width} "
                                    "must be multiples of 4.")
        return super().check(o, adapter)

    # ------------------------------------------------------------------ plan
    def plan(self, o: SparsityOptions, ctx) -> WeightsPlan:
        """One statistics pass, layer by layer; each layer's masks (or, with OWL, its outlier ratio) are made as
        soon as its statistics are complete, while its weights are in memory. OWL's masks wait for every layer's
        ratio and visit the layers once more."""
        if ctx.ckpt is None or ctx.sets is None:
            raise MoePruneError("wanda scores weights by the input norms of each expert's routed tokens: use `moeprune "
                                "prune MODEL --calib NAME=PATH` with it.")
        dtype = ctx.calib.dtype if ctx.calib is not None else "auto"
        view = ctx.layer_view(dtype=dtype)  # with --lazy: one decoder layer in memory at a time
        model = view.model
        adapter = get_adapter(model.config, model=model)
        target = 0.5 if o.sparsity is None else float(o.sparsity)
        m = OWL_M if o.owl_m is None else o.owl_m
        masks = _Masks(model, adapter, o.pattern, ctx.lazy)
        ratios: dict[int, float] = {}

        def visit(layer: int, layer_stats) -> None:  # layer's statistics complete, its weights resident
            if o.owl:  # D_ℓ: the mean from column sums (`score_mass`), then one counting pass over the weights
                with reuse_freed_memory(_reuse(adapter, model, layer)):
                    mass, n = map(sum, zip(*_each_matrix(model, adapter, layer_stats, layer, score_mass), strict=True))
                    threshold = m * mass / n  # M · mean(S_ℓ)
                    count = sum(_each_matrix(model, adapter, layer_stats, layer,
                                             lambda w, sq: outlier_count(w, sq, threshold)))
                    ratios[layer] = count / n
            else:
                masks.add(layer, layer_stats, target)
                ctx.layer_planned(view, layer, lambda n=layer: self.apply_layer(model, adapter, masks.plan(n), n))

        stats = _neuron_stats(ctx, view, dtype, visit)
        if o.owl:
            sparsity = owl_sparsities(ratios, target, OWL_LAMBDA if o.owl_lambda is None else o.owl_lambda)
            layers = sorted(stats)
            for n, layer in enumerate(bar := tqdm(layers, leave=False)):
                bar.set_description(f"wanda masks (layer {n + 1}/{len(layers)})")
                with view.layer(layer):
                    masks.add(layer, stats[layer], sparsity[layer], outlier=ratios[layer])
                    ctx.layer_planned(view, layer, lambda n=layer: self.apply_layer(model, adapter, masks.plan(n), n))
        removed = sum(v["sparsity"] for v in masks.per_layer.values()) / len(masks.per_layer)
        logger.info("wanda (%s%s): %.1f%% of the routed-expert weights zeroed", o.pattern, ", OWL" if o.owl else "",
                    100 * removed)
        settings = {"sparsity": target, "pattern": o.pattern, "owl": bool(o.owl)}
        if o.owl:
            settings |= {"owl_m": m, "owl_lambda": OWL_LAMBDA if o.owl_lambda is None else o.owl_lambda}
        return WeightsPlan("wanda", adapter.num_experts, adapter.expert_width, masks.experts, {}, settings=settings,
                           summary={"sparsity": removed, "layers": dict(sorted(masks.per_layer.items(),
                                                                               key=lambda kv: int(kv[0]))),
                                    "tensors": masks.tensors}, model_type=adapter.model_type, masks=True)

    def describe(self, plan: WeightsPlan) -> str:
        st = plan.settings
        return (f"wanda {st.get('pattern', 'unstructured')}{' + OWL' if st.get('owl') else ''}: "
                f"{100 * plan.summary.get('sparsity', 0):.1f}% of the routed-expert weights zeroed")

    def report(self, plan: WeightsPlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        out = super().report(plan, before, after)
        out["note"] = ("routed-expert weights zeroed in place (dense export, same shapes and config); "
                       "summary.tensors gives the zero fraction of every expert tensor; verify compares with the "
                       "original whose same weights are zeroed")
        return out


def _each_matrix(model, adapter: MoEAdapter, stats, layer: int, of, keyed: bool = False):
    """`of(weight [out, in], in_sq [in])` of every (expert, role) matrix of one layer, one at a time (`keyed`: with
    its (expert, role))."""
    block = adapter.block(model, layer)
    for j in range(stats.num_experts):
        views = adapter.expert_views(block, j)
        for role, field in ROLE_INPUT.items():
            if role not in views:  # up-only experts have no gate
                continue
            value = of(views[role], stats.sums[field][j])
            yield ((j, role), value) if keyed else value


def _reuse(adapter: MoEAdapter, model, layer: int) -> int:
    """The heap reuse threshold for one layer's per-matrix temporaries (`io/memory.py`)."""
    largest = max(w.numel() for w in adapter.expert_views(adapter.block(model, layer), 0).values())
    return max(COMPUTE_REUSE, 16 * largest)


class _Masks:
    """The plan's keep masks as bits, one layer at a time (in a dict, or on disk when the run is lazy), and what the
    summary reports: the zero fraction of every tensor and per layer."""

    def __init__(self, model, adapter: MoEAdapter, pattern: str, lazy: bool) -> None:
        self.model, self.adapter, self.pattern = model, adapter, pattern
        self.experts: dict | SpilledLayers = SpilledLayers() if lazy else {}
        self.tensors: dict[str, float] = {}
        self.per_layer: dict[str, dict] = {}

    @torch.no_grad()
    def add(self, layer: int, stats, sparsity: float, outlier: float | None = None) -> None:
        """Mask layer `layer` (its weights must be in memory) at `sparsity`."""
        zeros = total = 0
        # each matrix's score and mask temporaries reuse the previous matrix's pages (io/memory.py)
        with reuse_freed_memory(_reuse(self.adapter, self.model, layer)), layer_sink(self.experts, layer) as put:
            masks = _each_matrix(self.model, self.adapter, stats, layer,
                                 lambda w, sq: wanda_mask(w, sq, self.pattern, sparsity), keyed=True)
            for (j, role), keep in masks:
                put(j, role, pack(keep))  # lazy: written to the plan's store at once, not held for the whole layer
                kept = int(torch.count_nonzero(keep))  # a bool sum widens to int64 first: 4x slower
                self.tensors[f"layer.{layer}.expert.{j}.{role}"] = round(1 - kept / keep.numel(), 6)
                zeros += keep.numel() - kept
                total += keep.numel()
        self.per_layer[str(layer)] = {"sparsity": round(zeros / total, 6), "target": round(sparsity, 6),
                                      **({"outlier_ratio": round(outlier, 6)} if outlier is not None else {})}

    def plan(self, layer: int) -> WeightsPlan:
        """The masks of layer `layer` alone, as a plan (applied to that layer while it is resident)."""
        return WeightsPlan("wanda", self.adapter.num_experts, self.adapter.expert_width,
                           {layer: self.experts[layer]}, {}, masks=True)


def _neuron_stats(ctx, view, dtype: str, on_layer_stats) -> dict:
    """in_sq / act_sq of every routed expert (`stats/neurons.py` sums) of the model `view` shows, one decoder layer
    at a time (`stats/neurons_layered.py`: in memory, or over the lazy model), `on_layer_stats` called as each
    layer's sums complete."""
    from moeprune.stats.neurons_layered import collect_neuron_stats_layered, neuron_stats

    if view.lazy is not None:
        return neuron_stats(ctx, False, lazy=view.lazy, layer_context=view.layer, dtype=dtype,
                            on_layer_stats=on_layer_stats)
    return collect_neuron_stats_layered(view.model, ctx.sets, gradients=False, batch_size=ctx.calib.batch_size,
                                        device=ctx.calib.device, on_layer_stats=on_layer_stats)


SPARSITY = register_stage(SparsityStage())

"""`Stage`: one compression step of a recipe, described by what it needs, how it plans, applies and is checked.

    options  = stage.parse(raw)                      typed, validated options (no model needed)
    config'  = stage.check(options, adapter)         refuses what cannot work on the model *as the earlier stages
                                                     leave it* (counts, widths, top-k) — before any work —
                                                     and returns the config the stage will leave behind
    plan     = stage.plan(options, ctx)              statistics -> plan (JSON data, versioned by `plan_format`)
    stage.apply(model, adapter, plan)                surgery on in-memory modules: `apply_layer` on every decoder
                                                     layer, then `update_config` once (and `apply_shards` on disk)
    stage.apply_layer(model, adapter, plan, i)       surgery on decoder layer i only (lazy, layer-by-layer export)
    stage.reference(ref, plan)                       the same change expressed on the ORIGINAL model, which keeps
                                                     every expert slot and full width: masking, zeroing, or the
                                                     merge written into the dominant's slot (`stages/reference.py`)

A recipe chains stages: stage n is calibrated on the model as stages 1..n-1 left it, and verification applies
every stage's reference to one copy of the original (`pipeline/verify.py`). Adding a method family = one file
with a `Stage` subclass registered in `STAGES` (see docs/adding-a-method.md).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.registry import Registry

if TYPE_CHECKING:
    from moeprune.stages.reference import Reference


class Need(Enum):
    """What a stage observes. The calibration engine collects, per stage, exactly what its stage needs."""

    WEIGHTS = "weights"  # expert weights only (data-free criteria)
    SEED = "seed"  # nothing but a seed (random control)
    ROUTED = "routed"  # routed-token statistics (counts, gates, activation norms, ...)
    PROBES = "probes"  # every expert's output on probe tokens, router-logit Gram (merge grouping)
    DECIDE = "decide"  # decides layer by layer inside the calibration pass (prune-as-you-go, NAEE)
    NEURONS = "neurons"  # per-neuron activation statistics inside every routed expert
    GRADIENTS = "gradients"  # per-neuron gradients of the calibration loss (HEAPr)
    TEACHER = "teacher"  # the model before the stage runs next to it on calibration text (repair, distillation)
    HESSIANS = "hessians"  # per-expert input Gram matrices from each expert's routed tokens (GPTQ)

    @property
    def calibrated(self) -> bool:
        return self not in (Need.WEIGHTS, Need.SEED)


@dataclass(frozen=True)
class StageOptions:
    """Base of every stage's options: the method and its ratio. Subclasses add fields with defaults."""

    method: str
    ratio: float
    lists: ClassVar[tuple[str, ...]] = ()  # repeatable options: a string or a list becomes a tuple

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise MoePruneError(f"ratio must be a number like 0.25, got {self.ratio!r}.")
        for name in self.lists:
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                object.__setattr__(self, name, tuple([value] if isinstance(value, str) else value))

    def given(self) -> dict[str, Any]:
        """Options that differ from their defaults (what a recipe file needs to say)."""
        out: dict[str, Any] = {"method": self.method, "ratio": self.ratio}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in out and f.default is not dataclasses.MISSING and value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class Stage:
    """One kind of compression step. Subclasses set the class attributes and implement the methods."""

    kind: ClassVar[str] = ""  # "experts", "merge", "neurons", ...
    plan_format: ClassVar[str] = ""  # JSON "format" of its plans, e.g. "moeprune.plan/1"
    reads_formats: ClassVar[tuple[str, ...]] = ()  # older formats its `load_plan` still reads
    legacy_plan_name: ClassVar[str | None] = None  # the plan's file name in one-stage exports (older releases)
    options_type: ClassVar[type[StageOptions]] = StageOptions
    applies_to_shards: ClassVar[bool] = False  # can edit safetensors shards without loading the model
    takes_ratio: ClassVar[bool] = True  # False: the stage removes nothing (repair, distillation) and refuses a ratio
    changes_weights: ClassVar[bool] = False  # True: writes new values (verify's masked original is then no reference)
    kind_option: ClassVar[str | None] = None  # the option a recipe's `kind: X` sets when X is not the stage's kind
    lazy_problem: ClassVar[str | None] = None  # why the stage cannot run layer by layer (refused before any work)

    # ------------------------------------------------------------------ methods of this stage
    @classmethod
    def methods(cls) -> list[str]:
        raise NotImplementedError

    # ------------------------------------------------------------------ options
    def parse(self, raw: Mapping[str, Any], where: str) -> StageOptions:
        """Typed options from a recipe entry or CLI flags; unknown and inapplicable keys are refused."""
        names = [f.name for f in dataclasses.fields(self.options_type)]
        unknown = [k for k in raw if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(_flag(k) + (f" (did you mean {_flag(close[0])}?)" if close else ""))
            raise MoePruneError(f"{where}: {', '.join(hints)} {'does' if len(hints) == 1 else 'do'} not apply to "
                                f"{self.kind} stages (method {raw.get('method')!r}); they take "
                                f"{', '.join(_flag(n) for n in names)} (in a recipe: the same without dashes).")
        if self.takes_ratio and "ratio" not in raw:
            raise MoePruneError(f"{where}: give a ratio (e.g. ratio: 0.25).")
        if not self.takes_ratio and "ratio" in raw:
            raise MoePruneError(f"{where}: {self.kind} stages remove nothing, so ratio does not apply; drop it (the "
                                "stage before says how much is removed).")
        try:
            options = self.options_type(**dict(raw))
            self.validate_options(options)
        except (TypeError, ValueError, MoePruneError) as e:
            raise MoePruneError(f"{where}: {e}") from None
        return options

    def validate_options(self, options: StageOptions) -> None:
        """Checks that need no model (types, ranges, options that only apply to some methods)."""

    def needs(self, options: StageOptions) -> set[Need]:
        raise NotImplementedError

    def plans_from_text(self, options: StageOptions) -> bool:
        """True when the stage observes the model on calibration text itself while it plans (neuron statistics, a
        fitted routing policy), so `moeprune plan` takes the checkpoint folder and --calib rather than a
        statistics file."""
        return Need.NEURONS in self.needs(options)

    def final_only(self, options: StageOptions) -> str | None:
        """Why no stage can follow this one (e.g. non-uniform expert widths), or None when one can."""
        return None

    def lazy_plan_problem(self, options: StageOptions) -> str | None:
        """Why these options cannot be planned layer by layer (refused before any work), or None. Default: the
        stage's `lazy_problem`, whatever the options."""
        return self.lazy_problem

    def plans_per_layer(self, options: StageOptions) -> bool:
        """True when its plan of decoder layer i is final while a planning pass holds layer i, and it says so then
        (`StageContext.layer_planned`): a lazy run's export may ride on that pass (`pipeline/fused.py`)."""
        return False

    def shards_problem(self, ckpt, adapter: MoEAdapter) -> str | None:
        """Why this stage's plans cannot be applied on the checkpoint's shards (`applies_to_shards`), read off its
        headers, or None. Checked before any work when the export will edit the shards."""
        return None

    def shard_view(self, ckpt, adapter: MoEAdapter, plan) -> list | None:
        """The checkpoint's tensors as `plan` leaves them, each as byte ranges of the source's shards (what
        `apply_shards` would write), or None where the plan computes new values. A lazy run's later stages read
        the model through this view (`StageContext.lazy_model`): only the bytes that remain are read."""
        return None

    def lazy_reload_problem(self, options: StageOptions, adapter: MoEAdapter) -> str | None:
        """Why its export cannot be read back layer by layer (verification, held-out split of a lazy run), or
        None. Checked before any work when the run is lazy."""
        return None

    def check_previous(self, options: StageOptions, previous: list) -> None:
        """Refuse a place in the recipe this stage cannot take (`previous`: the `StageSpec`s before it), before any
        work (e.g. a repair with nothing before it to repair)."""

    def check(self, options: StageOptions, adapter: MoEAdapter) -> Any:
        """Refuse options that cannot work on this model (before any work); return the config it leaves."""
        raise NotImplementedError

    # ------------------------------------------------------------------ plans
    def plan(self, options: StageOptions, ctx):
        """`ctx` is a `pipeline.context.StageContext`: the model as earlier stages left it, and the data."""
        raise NotImplementedError

    def load_plan(self, raw: dict, source: str):
        raise NotImplementedError

    def validate_plan(self, plan, adapter: MoEAdapter) -> None:
        plan.validate(adapter)

    def next_config(self, plan, adapter: MoEAdapter) -> Any:
        """The config of the model once `plan` is applied to the model `adapter` describes (config only)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ surgery
    def apply(self, model: nn.Module, adapter: MoEAdapter, plan) -> None:
        """Whole model in memory: `check_apply`, then `apply_layer` on every decoder layer, then the config once."""
        self.check_apply(model, adapter, plan)
        n = len(adapter.decoder_layers(model))
        for i in (bar := tqdm(range(n), leave=False)):
            bar.set_description(f"{self.kind} surgery (layer {i + 1}/{n})")
            self.apply_layer(model, adapter, plan, i)
        self.update_config(model.config, adapter, plan)
        logger.info("applied %s", self.describe(plan))

    def check_apply(self, model: nn.Module | None, adapter: MoEAdapter, plan) -> None:
        """Every refusal before a tensor changes (`model` None: config level only, for layer-by-layer apply)."""
        self.validate_plan(plan, adapter)

    def apply_layer(self, model: nn.Module, adapter: MoEAdapter, plan, layer: int) -> None:
        """Surgery on decoder layer `layer` only (materialised; the others may be on meta); a no-op for layers the
        plan does not touch. `adapter` describes the model before this stage; `model.config` is not changed."""
        raise NotImplementedError

    def update_config(self, config: Any, adapter: MoEAdapter, plan) -> None:
        """Write into `config` (in place: modules keep their reference) what `next_config` changes."""
        before, after = _text(adapter.root_config), _text(self.next_config(plan, adapter))
        target = _text(config)
        stored = vars(before)  # raw attributes: per-layer configs (dots3) refuse getattr of a per-layer key
        for key, value in vars(after).items():
            if not key.startswith("_") and stored.get(key) != value:
                setattr(target, key, copy.deepcopy(value))

    def apply_shards(self, ckpt, adapter: MoEAdapter, plan, out_dir: Path, max_shard_bytes: int) -> None:
        raise MoePruneError(f"{self.kind} stages are applied in memory; drop --streaming.")

    def finish_export(self, folder: Path, model_type: str, plan) -> None:
        """Called on the saved folder when this stage is the recipe's last (e.g. non-uniform width markers)."""

    def survivors(self, plan) -> dict[int, list[int]] | None:
        """Per MoE layer, the current experts that remain (renumbered in that order); None = all of them."""
        return None

    def reference(self, ref: Reference, plan) -> None:
        """Write this stage's change onto the reference (current numbering; `survivors` renumbers after); change
        tensors only of the layers in `ref.scope(plan.layers)` (a layer-by-layer verify materialises one)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ reports
    def provenance(self, plan) -> dict:
        raise NotImplementedError

    def report(self, plan, before: MoEAdapter, after: MoEAdapter) -> dict:
        raise NotImplementedError

    def describe(self, plan) -> str:
        return f"{self.kind} ({plan.method})"


def apply_chain(model: nn.Module, chain: list[tuple[Stage, Any]]) -> nn.Module:
    """Apply every plan in order, in memory; each stage sees the adapter of the model as the plans before left it."""
    from moeprune.models import get_adapter

    for stage, plan in chain:
        stage.apply(model, get_adapter(model.config, model=model), plan)
    return model


def apply_chain_layer(model: nn.Module, chain: list[tuple[Stage, Any]], layer: int,
                      adapters: list[MoEAdapter]) -> nn.Module:
    """Apply every plan of `chain` to decoder layer `layer` only (e.g. one layer of a lazily loaded model);
    `adapters[n]` = the model as plans 1..n left it (`pipeline.recipe.chain_adapters`), plans already validated.
    The model's config is not changed (see `sync_chain_config`)."""
    for (stage, plan), adapter in zip(chain, adapters, strict=False):
        stage.apply_layer(model, adapter, plan, layer)
    return model


def sync_chain_config(model: nn.Module, chain: list[tuple[Stage, Any]], adapters: list[MoEAdapter]) -> None:
    """`model.config` as the chain leaves it (once, for a model whose layers `apply_chain_layer` changes)."""
    for (stage, plan), adapter in zip(chain, adapters, strict=False):
        stage.update_config(model.config, adapter, plan)


def _text(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def original_experts(chain: list[tuple[Stage, Any]], layers: list[int], num_experts: int) -> dict[int, list[int]]:
    """Original indices of the experts that remain after every stage (merged experts: their dominants)."""
    slots = {layer: list(range(num_experts)) for layer in layers}
    for stage, plan in chain:
        for layer, kept in (stage.survivors(plan) or {}).items():
            slots[layer] = [slots[layer][i] for i in kept]
    return slots


def _flag(name: str) -> str:
    return "--" + str(name).replace("_", "-")


STAGES: Registry[Stage] = Registry("stage kind")


def register_stage(stage: Stage) -> Stage:
    STAGES.register(stage.kind, stage)
    return stage


def stage_for_method(method: str | None, where: str = "") -> Stage:
    """The stage whose method families include `method`; did-you-mean over every method of every stage."""
    for _, stage in STAGES.items():
        if method in stage.methods():
            return stage
    every = sorted({m for _, s in STAGES.items() for m in s.methods()})
    close = difflib.get_close_matches(str(method), every, n=1)
    by_kind = "; ".join(f"{kind}: {', '.join(sorted(s.methods()))}" for kind, s in STAGES.items())
    prefix = f"{where}: " if where else ""
    raise MoePruneError(f"{prefix}unknown method {method!r}." + (f" Did you mean {close[0]!r}?" if close else "")
                        + f" Choose one of: {by_kind}.")


def stage_for_format(fmt: str | None, source: str) -> Stage:
    for _, stage in STAGES.items():
        if fmt == stage.plan_format or fmt in stage.reads_formats:
            return stage
    known = ", ".join(s.plan_format for _, s in STAGES.items())
    raise MoePruneError(f"{source}: plan format {fmt!r} is not one moeprune knows ({known}).")


def adapter_after(adapter: MoEAdapter, config: Any) -> MoEAdapter:
    """The same family's adapter over a changed config (counts, widths), e.g. the model as a stage leaves it.

    Copied rather than looked up again, so a structure the generic adapter detected from weights carries over."""
    new = copy.copy(adapter)
    new.__dict__ = {k: v for k, v in adapter.__dict__.items() if not k.startswith("_cached")}
    new.root_config = config
    new.config = config.get_text_config() if hasattr(config, "get_text_config") else config
    new._check_config()
    return new


def config_copy(adapter: MoEAdapter) -> Any:
    return copy.deepcopy(adapter.root_config)

"""What a stage sees while it plans: the model as the earlier stages of its recipe left it, and the data.

    ctx.routed_stats(decide=None)   routed statistics (and probes) of that model on the calibration sets
    ctx.model(dtype)                the original, loaded, with every earlier stage's plan applied in memory
    ctx.weights_source()            where data-free criteria read expert weights from
    ctx.layer_view(dtype)           that model read one decoder layer at a time (in memory, or lazily)

For the first stage these read the checkpoint itself (so `--lazy` and torchrun work as in `moeprune calibrate`);
later stages replay the earlier plans on a freshly loaded copy (one model in memory at a time), or, when `lazy`,
on the original loaded lazily: layer i's context materialises it from the checkpoint and applies plans 1..n-1 to
it (`stages.base.apply_chain_layer`), the model's config says what those plans leave (`sync_chain_config`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from moeprune.calibration.data import CalibSet
from moeprune.calibration.run import CalibrateOptions, calibrate, calibrate_model, prepare
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.fit import choose_lazy
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.pipeline.recipe import check_chain
from moeprune.stages.base import apply_chain, apply_chain_layer, sync_chain_config
from moeprune.stats.store import ExpertStats, StatsView


@dataclass
class StageContext:
    ckpt: Checkpoint | None  # None when planning from a statistics file
    adapter: MoEAdapter  # the model as earlier stages leave it (config level)
    previous: list[tuple[Any, Any]]  # (stage, plan) of the earlier stages
    calib: CalibrateOptions | None = None
    sets: list[CalibSet] | None = None
    stats: list[ExpertStats] = field(default_factory=list)  # routed statistics this stage collected
    given: ExpertStats | None = None  # statistics read from a file (`moeprune plan STATS`) instead of calibrating
    lazy: bool = False  # later stages replay the earlier plans one decoder layer at a time (checkpoints > memory)
    export: Any = None  # the last stage of a lazy run: its planning pass writes the export (`pipeline/fused.py`)

    @classmethod
    def for_source(cls, path: Path | None, stats: ExpertStats | None, calib: CalibrateOptions | None,
                   spec) -> StageContext:
        """`moeprune plan`: one stage planned from a checkpoint folder (+ calibration text) or a statistics file."""
        if stats is not None:
            return cls(None, StatsView(stats), [], given=stats)
        ckpt = Checkpoint.open(path)
        adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
        check_chain([spec], adapter)
        if spec.stage.plans_from_text(spec.options):
            if calib is None:
                raise MoePruneError(f"--method {spec.options.method} observes the model on calibration text: pass "
                                    "--calib NAME=PATH and the checkpoint folder as MODEL.")
            sets = prepare(path, calib)[2]
            return cls(ckpt, adapter, [], calib, sets, lazy=choose_lazy(calib.lazy, ckpt, calib.dtype))
        return cls(ckpt, adapter, [], calib)

    def model(self, dtype: str = "auto", device: str | None = None) -> nn.Module:
        device = device or (self.calib.device if self.calib is not None else "cpu")
        return apply_chain(load_model(self.ckpt.path, dtype=dtype, device=device), self.previous)

    def routed_stats(self, decide=None) -> ExpertStats:
        if decide is not None and self.calib is None:
            raise MoePruneError("NAEE and prune-as-you-go choose experts while the model runs on calibration text: "
                                "use `moeprune prune MODEL --calib NAME=PATH` (with --policy reconstruction or "
                                "--as-you-go).")
        if self.given is not None:
            return self.given
        if self.calib is None:
            raise MoePruneError("this method needs calibration statistics: run `moeprune calibrate MODEL --calib "
                                "NAME=PATH --out stats.safetensors` and plan from that file, or use `moeprune prune "
                                "--calib ...`.")
        if not self.previous:
            stats = calibrate(self.ckpt.path, self.calib, decide=decide, sets=self.sets)
        elif self.lazy:
            lazy, layer_context = self.lazy_model(dtype=self.calib.dtype)
            stats = calibrate_model(lazy.model, self.sets, self.calib, source=self.ckpt.path, decide=decide,
                                    layer_context=layer_context)
            del lazy
        else:
            model = self.model(dtype=self.calib.dtype)
            stats = calibrate_model(model, self.sets, self.calib, source=self.ckpt.path, decide=decide)
            del model
        self.stats.append(stats)
        return stats

    def lazy_model(self, dtype: str = "auto", head: bool = False):
        """(LazyModel of the original, layer_context): `layer_context(i)` materialises decoder layer i and applies
        every earlier plan to it; the model's config is the one those plans leave. Where the first earlier plan
        only selects bytes of the shards (expert removal: `Stage.shard_view`), the model is read through that
        view, so the removed experts are never read again, and only the later plans are applied per layer
        (`LazyModel.view_holds`)."""
        from moeprune.io.lazy import load_lazy
        from moeprune.pipeline.recipe import chain_adapters

        adapters = chain_adapters(self.previous, get_adapter(self.ckpt.config, weight_keys=self.ckpt.names()))
        chain, view = self.previous, None
        if chain:
            (stage, plan), *rest = chain
            view = stage.shard_view(self.ckpt, adapters[0], plan)
        if view is None:
            lazy = load_lazy(self.ckpt.path, dtype=dtype, head=head)
        else:
            lazy = load_lazy(self.ckpt.path, dtype=dtype, head=head, config=adapters[1].root_config, tensors=view)
            lazy.view_holds, chain, adapters = 1, rest, adapters[1:]
        sync_chain_config(lazy.model, chain, adapters)

        @contextmanager
        def layer_context(i: int) -> Iterator[nn.Module]:
            with lazy.layer(i) as module:
                apply_chain_layer(lazy.model, chain, i, adapters)
                yield module

        return lazy, layer_context

    def layer_view(self, dtype: str = "auto") -> LayerView:
        """The model as earlier stages leave it, for stages that visit it one decoder layer at a time: in memory
        (every layer already there; the context does nothing) or, when `lazy`, the original loaded lazily with
        layer i materialised and the earlier plans applied inside `view.layer(i)` (`lazy_model`)."""
        if self.lazy:
            lazy, context = self.lazy_model(dtype=dtype)
            return LayerView(lazy.model, context, lazy)
        return LayerView(self.model(dtype=dtype), lambda i: nullcontext(), None)

    def layer_planned(self, view: LayerView, layer: int, apply: Callable[[], None]) -> None:
        """A stage with `plans_per_layer` calls this when its plan of decoder layer `layer` is final while `view`
        holds the layer; `apply()` applies that plan to it. When this run's export rides on the pass
        (`pipeline/fused.py`), the layer is written now; otherwise nothing happens."""
        if self.export is not None and view.lazy is not None:
            self.export.layer_planned(view.lazy, layer, apply)

    def weights_source(self):
        """The checkpoint folder, or (after earlier stages) the weight summaries of the model they left."""
        if self.ckpt is None:
            return self.given  # data-free criteria refuse statistics with a clear message
        if not self.previous:
            return self.ckpt.path
        from moeprune.criteria.weights import summarize_model
        from moeprune.select.build import InMemoryWeights

        if self.lazy:  # one decoder layer at a time; summaries are per layer
            lazy, layer_context = self.lazy_model()
            adapter = get_adapter(lazy.model.config, model=lazy.model)
            summaries = {}
            moe = adapter.moe_layers()
            for n, layer in enumerate(bar := tqdm(moe, leave=False)):
                bar.set_description(f"expert weight summaries (layer {n + 1}/{len(moe)})")
                with layer_context(layer):
                    summaries[layer] = summarize_model(lazy.model, adapter, layers=[layer])[layer]
            return InMemoryWeights(adapter, summaries)
        model = self.model()
        adapter = get_adapter(model.config, model=model)
        return InMemoryWeights(adapter, summarize_model(model, adapter))


@dataclass
class LayerView:
    """`StageContext.layer_view`: the model, the context that makes decoder layer i readable, and the `LazyModel`
    behind it (None in memory; stages that collect statistics layer by layer pass it on)."""

    model: nn.Module
    layer: Callable[[int], AbstractContextManager]
    lazy: Any = None

"""The export written during the last stage's planning pass: each decoder layer as soon as its plan is final.

A layer-by-layer run (`--lazy`, or a model larger than memory) plans each stage in one or more passes over the
checkpoint, then the export reads every decoder layer once more (`io/layered_export.py`). For a last stage whose
plan of layer i is final while a planning pass holds layer i (`Stage.plans_per_layer`: wanda makes layer i's
masks while its weights are resident; a forward-only neuron criterion such as CAMERA-P with an expert budget
chooses layer i's neurons from layer i's sums), that last read is the planning pass itself:

    stages 1..N-1 planned as before
    stage N's pass, layer i materialised (earlier plans applied by the layer context):
        plan of layer i final -> ctx.layer_planned(view, i, apply)
                                 stored dtypes restored, apply() (stage N's plan of layer i), layer i appended to
                                 the export's shards (`LayerExport.write_layer`, the same writer as the export)
    export: the layers no pass wrote (dense layers, layers after the last MoE layer) read, the chain applied,
            written; config, plans and report as in any export

The result is the export `export_layered` writes, tensor for tensor (tests/test_fused_export.py). That needs the
pass to hold each layer as the export would read it. Checked up front (`fused_problem`): the run is lazy and writes
a layered export, the source is not quantized (the export then dequantizes in its own dtype), and the pass loads
in the dtype the export loads in ("auto" / "stored", or the checkpoint's own). Checked at the first layer: with
earlier stages, no tensor of the layer is in another dtype than stored (their plans were applied before the stored
dtypes are restored, where the export applies them after); otherwise the pass stops writing, deletes what it wrote
and the export reads every layer as usual.
On the 24-layer benchmark checkpoint this saves one read of the checkpoint per run (`benchmarks/RESULTS.md`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moeprune.io.checkpoint import Checkpoint
from moeprune.io.layered_export import LayeredResult, LayerExport, export_layered
from moeprune.log import logger
from moeprune.models.base import MoEAdapter


def fused_problem(specs: list, ckpt: Checkpoint, calib_dtype: str | None, mode: str, lazy: bool) -> str | None:
    """Why the export of this run cannot ride on its last stage's planning pass, or None when it can."""
    from moeprune.io.stock import config_dtype

    last = specs[-1]
    if not lazy:
        return "the stages plan on the whole model in memory"
    if mode != "layered":
        return f"the export is written {mode}"
    if not last.stage.plans_per_layer(last.options):
        return f"{last.where} plans after its passes, not layer by layer"
    if ckpt.quantization is not None:
        return "the source is quantized"
    stored = config_dtype(ckpt.config)
    if calib_dtype not in ("auto", "stored") and (stored is None or calib_dtype != str(stored).removeprefix("torch.")):
        return f"the planning pass computes in {calib_dtype}, the export reads the stored dtype"
    return None


class FusedExport:
    """The export's layers as the last stage's pass plans them (module docstring); `finish` writes the rest."""

    def __init__(self, ckpt: Checkpoint, folder: Path, max_bytes: int, earlier_stages: int) -> None:
        self.ckpt, self.folder, self.max_bytes = ckpt, folder, max_bytes
        self.earlier = earlier_stages
        self.layers: LayerExport | None = None
        self.stopped: str | None = None  # why the pass stopped writing

    def layer_planned(self, lazy, i: int, apply: Callable[[], None]) -> None:
        """Decoder layer i of `lazy` (materialised, earlier plans applied) is planned: write it with `apply()`."""
        if self.stopped is not None:
            return
        if self.layers is None:
            self.layers = LayerExport(self.ckpt, lazy, self.folder, self.max_bytes)
        elif self.layers.lazy is not lazy:
            return self._stop("the stage visits its layers in more than one model")
        if self.earlier:
            from moeprune.io.load import stored_dtype_changes

            other = stored_dtype_changes(lazy.layers[i], self.layers.stored_dtypes(i))
            if other:
                return self._stop(f"layer {i} holds {other[0]} in another dtype than stored, and earlier stages "
                                  "were applied to it")
        self.layers.write_layer(i, apply)

    def _stop(self, why: str) -> None:
        logger.info("the export reads the checkpoint again: %s", why)
        self.stopped = why
        if self.layers is not None:
            self.layers.abort()
            self.layers = None

    def finish(self, chain: list, adapters: list[MoEAdapter], provenance: dict) -> LayeredResult:
        """The layers no pass wrote, then the shards and config (or the whole layered export, if none was)."""
        if self.layers is None:
            return export_layered(self.ckpt, chain, adapters, self.folder, self.max_bytes, provenance)
        during = len(self.layers.written)
        logger.info("%d of %d decoder layers were written during the last stage's planning pass", during,
                    len(self.layers.lazy.layers))
        result = self.layers.finish(chain, adapters, provenance)
        result.written_while_planning = during
        return result

    def abort(self) -> None:
        if self.layers is not None:
            self.layers.abort()
            self.layers = None

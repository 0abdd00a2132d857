"""HEAPr and CAMERA-P neuron statistics one decoder layer at a time, for checkpoints larger than memory.

The sums are those of `stats/neurons.py` (same `NeuronCollector` instrumentation of the experts, same batches,
same loss); only the schedule differs. With h_0 the embeddings, h_{i+1} = f_i(h_i) decoder layer i (its kwargs —
masks, rotary embeddings — recorded by the engine's `capture`), logits = the model's head on h_L and
L = Σ next-token NLL over counted positions (`summed_nll`):

  up    for i = 0..L-1: materialise layer i, run every batch through it with its MoE experts instrumented
        (forward sums: act_sq, gact_sq, gact_max, count, down_sq); outputs advance to layer i+1. CAMERA-P stops
        here. HEAPr also stores each layer's inputs h_i in a `BoundaryCache` (CPU, spilled to disk past a budget).
  top   g_L = ∂L/∂h_L: the model's own final norm, head and logit post-processing on h_L, backward of the summed
        NLL, per batch and a chunk of positions at a time (`stats/head_gradient.py`).
  down  for i = L-1..first MoE layer: materialise layer i, recompute y = f_i(h_i) with grad, y.backward(g_{i+1});
        the collector's hooks record ∂L/∂h of every expert neuron (grad_sq, grad_count); g_i = ∂L/∂h_i goes on.
By the chain rule g_i is what a whole-model backward gives at layer i's input, so the sums equal the in-memory
`collect_neuron_stats` (tests/test_neurons_layered.py, every family). No parameter ever receives a gradient.

Memory: one layer, the boundary cache (≤ budget, default half the available memory), two layers' worth of
gradients g_{i+1}, g_i (N_tokens · H each, on CPU), one batch's activations; sums (5 · E · I float64 per MoE layer)
stay on `device` until the end. A lazy checkpoint's layers are read twice (up, down) for HEAPr, once for CAMERA-P.
Measured on an H200 (qwen3_moe-shaped, H=1024, 32 experts, 12 layers, float32, 16 x 512 tokens): peak GPU memory
1.18 GiB layered vs 6.04 GiB whole-model, 3.7x the time (two forwards, lazy reads); forward sums bit-identical to
the whole-model pass on the same device, grad_sq within 2e-6 (the run-to-run noise of CUDA's atomic adds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.calibration.data import CalibSet
from moeprune.calibration.engine import (
    LayerInputs,
    around_layers_on,
    call_layer,
    capture,
    outside_layers,
    run_layers,
    to_device,
)
from moeprune.calibration.session import eager_experts
from moeprune.errors import MoePruneError
from moeprune.io.lazy import LazyModel, load_lazy
from moeprune.io.stock import parse_dtype
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.stats.head_gradient import frozen, nll_gradient
from moeprune.stats.neurons import NeuronCollector, NeuronLayerStats, check_fused, windows
from moeprune.stats.neurons_cache import BoundaryCache, check_budget

LayerContext = Callable[[int], AbstractContextManager]
OnLayerStats = Callable[[int, NeuronLayerStats], None]  # (MoE layer, its completed forward sums)


def collect_neuron_stats_layered(path_or_lazy: str | Path | LazyModel | nn.Module, sets: list[CalibSet], *,
                                 gradients: bool, batch_size: int, device: str = "cpu", dtype: str = "float32",
                                 layer_context: LayerContext | None = None,
                                 cache_budget_bytes: int | None = None,
                                 on_layer_stats: OnLayerStats | None = None,
                                 inputs: bool = True) -> dict[int, NeuronLayerStats]:
    """{MoE layer: NeuronLayerStats} summed over every set, as `collect_neuron_stats` returns, one layer at a time.

    `path_or_lazy`: a checkpoint folder (loaded with `load_lazy(dtype=dtype, head=gradients)`), a `LazyModel`
    (its own dtype; `head=True` for gradients) or an in-memory model. `layer_context(i)` replaces the default
    "materialise layer i" (`LazyModel.layer`) and must leave the materialised layer in place in the model (e.g.
    materialise it and apply earlier recipe stages). `cache_budget_bytes`: in-memory bytes of the HEAPr boundary
    cache before it spills to a temporary folder ($TMPDIR); None = half the available memory, 0 = all on disk.
    `on_layer_stats(i, stats_i)` (forward sums only, `gradients=False`) runs once MoE layer i's sums are complete,
    while the layer is still materialised on `device`: a stage that needs the layer's weights with its statistics
    (wanda's masks) does its work there instead of reading the layer again. `inputs=False`: no in_sq sums.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MoePruneError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not sets:
        raise MoePruneError("neuron statistics need at least one calibration set (--calib NAME=PATH).")
    parse_dtype(dtype)
    if on_layer_stats is not None and gradients:
        raise MoePruneError("on_layer_stats reads forward sums; gradient sums complete only after the backward pass.")
    budget = check_budget(cache_budget_bytes)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MoePruneError(f"device {device!r}: no CUDA device is visible; use device='cpu'.")
    if isinstance(path_or_lazy, nn.Module):
        model, default_context = path_or_lazy, None
    else:
        lazy = path_or_lazy if isinstance(path_or_lazy, LazyModel) else load_lazy(path_or_lazy, dtype, head=gradients)
        model, default_context = lazy.model, lazy.layer
    adapter = get_adapter(model.config, model=model)
    for layer in adapter.moe_layers():
        check_fused(adapter, model, layer)
    if gradients:
        _check_head(model, adapter)
    context = layer_context or default_context or (lambda i: nullcontext())
    was_training = model.training
    model.eval()
    try:
        with eager_experts(model), torch.no_grad():
            ids, batches = _capture(model, adapter, sets, batch_size, device)
            if not gradients:
                stats = _forward(model, adapter, batches, device, context, cache=None, on_stats=on_layer_stats,
                                 inputs=inputs)
            else:
                with BoundaryCache(budget) as cache:
                    stats = _forward(model, adapter, batches, device, context, cache=cache, inputs=inputs)
                    grads = _head_gradients(model, adapter, batches, ids, device)
                    _backward(model, adapter, batches, grads, cache, device, context, stats)
    finally:
        model.train(was_training)
    return {layer: s.to("cpu") for layer, s in sorted(stats.items())}


def neuron_stats(ctx, gradients: bool, *, lazy: LazyModel | None = None,
                 layer_context: LayerContext | None = None, dtype: str = "float32",
                 on_layer_stats: OnLayerStats | None = None, inputs: bool = True) -> dict[int, NeuronLayerStats]:
    """The neuron stage's statistics in a lazy run: the stage context's checkpoint, calibration sets, batch size and
    device, in `dtype` (of a checkpoint loaded here; a given `lazy` model has its own). After earlier recipe stages
    the caller passes the `lazy` model it loaded and a
    `layer_context` that materialises layer i of it with those stages applied; without one that is refused (the
    statistics would be those of the original model)."""
    if ctx.calib is None or not ctx.sets:
        raise MoePruneError("neuron statistics need calibration text: pass --calib NAME=PATH.")
    if ctx.previous and layer_context is None:
        raise MoePruneError("a lazy neuron stage after earlier stages needs a layer_context that applies them to "
                            "each materialised layer; without one, run the recipe without --lazy.")
    source = lazy if lazy is not None else ctx.ckpt.path
    return collect_neuron_stats_layered(source, ctx.sets, gradients=gradients, batch_size=ctx.calib.batch_size,
                                        device=ctx.calib.device, dtype=dtype, layer_context=layer_context,
                                        on_layer_stats=on_layer_stats, inputs=inputs)


# ---------------------------------------------------------------------------------------------------- passes


def _capture(model: nn.Module, adapter: MoEAdapter, sets: list[CalibSet], batch_size: int,
             device: str) -> tuple[list[torch.Tensor], list[LayerInputs]]:
    """The windows of `collect_neuron_stats`, batch for batch: input ids and layer-0 inputs + per-layer kwargs.

    The modules around the decoder layers (embeddings, rotary embedding) run on `device`, as they do for a model
    loaded there: rotary cos/sin computed on a CPU differ from a GPU's by an ulp, enough to flip near-tied routing
    decisions (measured: 0.2% of expert assignments on a random 12-layer model). Kwargs are then kept on CPU."""
    ids, batches = [], []
    with around_layers_on(model, adapter.decoder_layers(model), device):
        home = model.get_input_embeddings().weight.device
        for input_ids, mask in windows(sets, batch_size):
            ids.append(input_ids)
            b = capture(model, adapter, input_ids.to(home), mask.to(home))
            b.kwargs, b.attention_mask = to_device(b.kwargs, "cpu"), b.attention_mask.cpu()
            batches.append(b)
    return ids, batches


def _forward(model: nn.Module, adapter: MoEAdapter, batches: list[LayerInputs], device: str,
             context: LayerContext, cache: BoundaryCache | None,
             on_stats: OnLayerStats | None = None, inputs: bool = True) -> dict[int, NeuronLayerStats]:
    """Up: forward sums of every MoE layer; with a `cache`, every layer input from the first MoE layer on is kept
    and `batches` end holding h_L; without one the pass stops after the last MoE layer."""
    moe = adapter.moe_layers()
    stats: dict[int, NeuronLayerStats] = {}
    active: list[NeuronCollector] = []

    def on_layer(i: int, layer: nn.Module):
        if i not in moe:
            return None
        col = NeuronCollector(model, adapter, gradients=False, layers=[i], inputs=inputs).__enter__()
        active.append(col)

        def cleanup() -> None:
            col.__exit__(None, None, None)
            stats.update(col.stats)
            active.remove(col)
            if on_stats is not None:
                on_stats(i, col.stats[i])

        return cleanup

    def on_batch(b: LayerInputs) -> None:
        for col in active:
            col.valid = b.attention_mask.reshape(-1).bool()

    steps = run_layers(model, adapter, batches, device=device, on_layer=on_layer, layer_context=context,
                       on_batch=on_batch)
    try:
        for i, _ in steps:
            if cache is not None and i >= moe[0]:
                cache.put(i, [b.hidden for b in batches])  # layer i's inputs (replaced by its outputs on resume)
            if cache is None and i == moe[-1]:
                break
    finally:
        steps.close()
    return stats


def _head_gradients(model: nn.Module, adapter: MoEAdapter, batches: list[LayerInputs], ids: list[torch.Tensor],
                    device: str) -> list[torch.Tensor]:
    """Top: g_L = ∂(summed NLL)/∂h_L per batch [B, S, H], on CPU, through the model's own final norm, head and logit
    post-processing, a chunk of positions at a time (`stats/head_gradient.py`)."""
    grads = []
    with around_layers_on(model, adapter.decoder_layers(model), device):
        for b, input_ids in zip(batches, ids, strict=True):
            inputs = {"input_ids": input_ids.to(device), "attention_mask": b.attention_mask.to(device)}
            grads.append(nll_gradient(model, adapter, inputs, b.hidden.to(device)).cpu())
    return grads


def _backward(model: nn.Module, adapter: MoEAdapter, batches: list[LayerInputs], grads: list[torch.Tensor],
              cache: BoundaryCache, device: str, context: LayerContext, stats: dict[int, NeuronLayerStats]) -> None:
    """Down: layer by layer from the top, recompute each layer from its cached inputs and backpropagate g_{i+1};
    the MoE layers' grad_sq / grad_count sums land in `stats`."""
    moe, layers = adapter.moe_layers(), adapter.decoder_layers(model)
    L = len(layers)
    bar = tqdm(range(L - 1, moe[0] - 1, -1), desc="neuron gradients", leave=False)
    for i in bar:
        bar.set_description(f"neuron gradients (layer {i + 1}/{L})")
        inputs = cache.pop(i)
        with context(i):
            layer = layers[i]
            # gradient sums only: the up pass has the forward sums
            col = (NeuronCollector(model, adapter, gradients=True, layers=[i], inputs=False, forward_sums=False)
                   if i in moe else None)
            with _on_device(layer, device), frozen(layer), col or nullcontext(), torch.enable_grad():
                next_grads = []
                for b, h_in, g_out in zip(batches, inputs, grads, strict=True):
                    if col is not None:
                        col.valid = b.attention_mask.reshape(-1).bool()
                    h = h_in.to(device).detach().requires_grad_(True)  # [B, S, H]
                    out = call_layer(layer, h, b.kwargs[i], device)
                    out = out[0] if isinstance(out, tuple) else out  # [B, S, H]
                    out.backward(g_out.to(device))
                    next_grads.append(h.grad.cpu())
            if col is not None:
                for name in ("grad_sq", "grad_count"):
                    stats[i].sums[name] = col.stats[i].sums[name]
        grads = next_grads
    logger.info("neuron gradients: %d layers backpropagated one at a time", L - moe[0])


# ---------------------------------------------------------------------------------------------------- helpers


def _check_head(model: nn.Module, adapter: MoEAdapter) -> None:
    """The loss needs the output head and every other module outside the decoder layers (final norm, embeddings)."""
    if model.get_output_embeddings() is None:
        raise MoePruneError(f"{type(model).__name__} has no output head; HEAPr needs the language-model loss.")
    if any(p.is_meta for p in outside_layers(model, adapter)):
        raise MoePruneError("the output head is not loaded (on meta): load the lazy model with "
                            "load_lazy(path, head=True) for gradient statistics.")


@contextmanager
def _on_device(module: nn.Module, device: str) -> Iterator[None]:
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)



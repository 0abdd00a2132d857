"""Layer-by-layer forward: each decoder layer gets exactly what a whole-model forward would feed it.

Capture: one pass of the model in which every decoder layer is replaced by a recorder that stores its keyword
arguments (attention mask, position ids, rotary embeddings, ...) and returns its input unchanged; the first layer's
input is the embedding output. The *model's own* code builds those arguments, per layer — so per-layer-type masks
(gpt-oss alternates sliding and full attention), padding masks and causal masks can never be lost or swapped, the
class of silent error where a tracer calibrates with bidirectional attention.

Run: layer i is moved to `device`, fed every cached batch with layer i's own kwargs, its output becomes layer
i+1's input, and `on_layer(i, layer)` runs before the layer so callers can attach hooks (statistics,
prune-as-you-go). No grad, no KV cache. Between layers the hidden states stay on the accelerator when they fit
(`pick_cache_device`: within a quarter of its free memory), so a GPU run copies nothing to the host per batch;
otherwise (and always on CPU runs) they wait in host memory.

Carried outputs: some decoder layers return more than their hidden states, and the model feeds the extra outputs
to the next layer (DeepSeek-sparse-attention families return `(hidden, topk_indices)` and take
`prev_topk_indices`). The arity is read from the layer's return annotation (`tuple[...]`); during capture the
recorder returns a unique marker in each extra position, and a next layer's kwarg holding a marker is recorded as
carried (`LayerInputs.carries`). When layer i runs, its extra outputs are written into layer i+1's kwargs.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.io.memory import COMPUTE_REUSE, reuse_freed_memory
from moeprune.models.base import MoEAdapter
from moeprune.models.forward_patch import forward_set


@dataclass
class LayerInputs:
    """One batch at the input of some decoder layer: hidden states [B, S, H] and each layer's kwargs."""

    hidden: torch.Tensor  # [B, S, H], on CPU (or the device, when every batch fits there: `cache_home`)
    kwargs: list[dict[str, Any]]  # per decoder layer
    attention_mask: torch.Tensor  # [B, S] (1 = real token)
    tag: str = ""  # which calibration set the rows come from
    carries: dict[int, dict[str, int]] = field(default_factory=dict)  # layer -> {kwarg: output index of layer-1}


class _Carried:
    """Marker a recorder returns in place of a decoder layer's extra output `index` (see module docstring)."""

    def __init__(self, layer: int, index: int):
        self.layer, self.index = layer, index


POSITIONAL = "__positional__"  # key of a layer's positional arguments after hidden_states (Gemma-4: per_layer_input)


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], device) -> Any:
    """layer(hidden, *positional, **kwargs) with the recorded arguments moved to `device`; the raw output."""
    kw = to_device(kwargs, device)
    return layer(hidden, *kw.pop(POSITIONAL, ()), **kw)


def output_arity(layer: nn.Module) -> int:
    """How many values the decoder layer's forward returns: the length of a `tuple[...]` return annotation
    (1 for a tensor, or when unannotated)."""
    try:
        hint = typing.get_type_hints(type(layer).forward).get("return")
    except Exception:  # noqa: BLE001  (unresolvable annotations: a plain tensor)
        return 1
    args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
    return len(args) if args and Ellipsis not in args else 1


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, adapter: MoEAdapter, input_ids: torch.Tensor,
            attention_mask: torch.Tensor, keep_on: str | torch.device = "cpu") -> LayerInputs:
    """Run the model with recording identity layers; return layer 0's input (on `keep_on`) and every layer's
    kwargs (where the model made them)."""
    layers = adapter.decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []
    carries: dict[int, dict[str, int]] = {}

    def recorder(index: int, arity: int):
        def forward(hidden_states, *args, **kw):
            if index == 0:
                hidden.append(hidden_states.detach().to(keep_on))
            kept = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
            if args:
                kept[POSITIONAL] = args
            for k, v in list(kept.items()):
                if isinstance(v, _Carried):  # an extra output of the previous layer, fed back to this one
                    carries.setdefault(index, {})[k] = v.index
                    kept[k] = None
            kwargs.append(kept)
            if index == len(layers) - 1:
                raise _StopForward
            return hidden_states if arity == 1 else (hidden_states, *(_Carried(index, j) for j in range(1, arity)))

        return forward

    home = model.get_input_embeddings().weight.device  # the ids go where the embedding is (CPU, or a GPU)
    try:
        with ExitStack() as patches:  # each layer's forward as it was afterwards (an earlier instance patch too)
            for i, layer in enumerate(layers):
                patches.enter_context(forward_set(layer, recorder(i, output_arity(layer))))
            model(input_ids=input_ids.to(home), attention_mask=attention_mask.to(home), use_cache=False)
    except _StopForward:
        pass
    assert len(kwargs) == len(layers), (len(kwargs), len(layers))
    return LayerInputs(hidden[0], kwargs, attention_mask, carries=carries)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`obj` with `fn(t)` in place of every tensor t in its nested tuples, dicts and lists (other values kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def to_device(obj: Any, device: torch.device | str, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """`obj` (tensors in nested tuples, dicts and lists) with every tensor on `device`. `memo` (id -> moved
    tensor, kept by the caller): a tensor met again moves once, and stays one tensor (every layer's kwargs of a
    captured batch hold the same rotary cos/sin and masks)."""
    if memo is None:
        return map_tensors(obj, lambda t: t.to(device))

    def moved(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            memo[id(t)] = t.to(device)
        return memo[id(t)]

    return map_tensors(obj, moved)


@torch.no_grad()
def run_layers(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: list[LayerInputs],
    *,
    device: str = "cpu",
    on_layer: Callable[[int, nn.Module], Callable[[], None] | None] | None = None,
    layer_context: Callable[[int], AbstractContextManager] | None = None,
    on_batch: Callable[[LayerInputs], None] | None = None,
    cache_device: str | None = None,
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield (layer index, outputs per batch [B, S, H]) layer by layer; `batches` hidden states advance in place.

    `layer_context(i)` (optional) is entered around everything layer i does: a lazily loaded model materialises
    the layer's weights from disk there and releases them on exit. `on_layer(i, layer)` runs once the layer is on
    `device` and may return a clean-up callable, called after layer i has seen every batch. The caller may
    replace the yielded outputs' contents before resuming (prune-as-you-go re-runs a layer with experts removed).
    `on_batch(batch)` runs before each batch enters the layer (collectors switch to the batch's set and mask).
    `cache_device`: where outputs wait for the next layer (None: `device` when they fit there, see `pick_cache_device`).
    """
    layers = adapter.decoder_layers(model)
    cache = cache_device or pick_cache_device(batches, device)
    bar = tqdm(range(len(layers)), leave=False)
    for i in bar:
        bar.set_description(f"calibrating (layer {i + 1}/{len(layers)})")
        with layer_context(i) if layer_context is not None else nullcontext():
            outputs = run_one(layers[i], i, batches, device, on_layer, on_batch, cache)
            yield i, outputs
        for b, out in zip(batches, outputs, strict=True):
            b.hidden = out


def pick_cache_device(batches: list[LayerInputs], device: str) -> str:
    """Where hidden states wait between layers: `device` when its batches already wait there (`make_batches`
    placed them) or it has room for them, else "cpu" (`cache_home`)."""
    held = sum(b.hidden.nbytes for b in batches if b.hidden.device == torch.device(device))
    return cache_home(device, sum(b.hidden.nbytes for b in batches), held)


def cache_home(device: str | torch.device, nbytes: int, held: int = 0) -> str:
    """`device` when it is an accelerator with room for `nbytes` of hidden states twice (inputs and outputs of a
    layer) within a quarter of its free memory plus the `held` bytes of them already there; else "cpu"."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return "cpu"
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return str(device) if 2 * nbytes <= (free + held) // 4 else "cpu"


def run_one(layer: nn.Module, i: int, batches: list[LayerInputs], device: str,
            on_layer: Callable[[int, nn.Module], Callable[[], None] | None] | None = None,
            on_batch: Callable[[LayerInputs], None] | None = None,
            cache_device: str = "cpu") -> list[torch.Tensor]:
    """Layer i on `device` over every batch; outputs [B, S, H] on `cache_device`; the layer goes back where it was."""
    home = next(layer.parameters()).device
    layer.to(device)
    cleanup = on_layer(i, layer) if on_layer is not None else None
    try:
        outputs = []
        with reuse_freed_memory(COMPUTE_REUSE):  # per-expert temporaries reuse the last batch's pages
            for b in batches:
                if on_batch is not None:
                    on_batch(b)
                out = call_layer(layer, b.hidden.to(device), b.kwargs[i], device)
                if isinstance(out, tuple):
                    for name, j in b.carries.get(i + 1, {}).items():  # extra outputs the next layer takes
                        b.kwargs[i + 1][name] = to_device(out[j], cache_device)
                    out = out[0]  # [B, S, H]
                outputs.append(out.detach().to(cache_device))
    finally:
        if cleanup is not None:
            cleanup()
        layer.to(home)
    return outputs


@contextmanager
def layers_return(model: nn.Module, adapter: MoEAdapter, hidden: torch.Tensor):
    """Every decoder layer's forward returns `hidden` (the last layer's output): the model's own code then applies
    its final norm, head and any logit post-processing.

    A layer whose return annotation is a tuple (`output_arity` > 1: DSA families unpack `hidden, topk = layer(...)`)
    returns `(hidden, None, ...)`. Some annotations are stale (the model keeps `hidden = layer(...)` whole): the next
    layer then receives that tuple as its input, and the last layer returns the bare tensor instead."""
    layers = adapter.decoder_layers(model)
    passed_whole = {"seen": False}  # a layer received the previous layer's tuple as its hidden states

    def returns(i: int, extra: tuple):
        def forward(*args, **kwargs):
            given = args[0] if args else kwargs.get("hidden_states")
            passed_whole["seen"] |= isinstance(given, tuple)
            last_whole = i == len(layers) - 1 and passed_whole["seen"]
            return (hidden, *extra) if extra and not last_whole else hidden

        return forward

    with ExitStack() as patches:  # each layer's forward as it was afterwards (an earlier instance patch too)
        for i, layer in enumerate(layers):
            patches.enter_context(forward_set(layer, returns(i, (None,) * (output_arity(layer) - 1))))
        yield


def outside_layers(model: nn.Module, adapter: MoEAdapter) -> list[nn.Parameter]:
    """The model's parameters outside its decoder layers (embeddings, final norm, head, ...)."""
    inner = {id(p) for p in adapter.decoder_layers(model).parameters()}
    return [p for p in model.parameters() if id(p) not in inner]


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model class's forward takes `logits_to_keep` (78 of the 80 buildable MoE families' classes)."""
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def last_hidden(model: nn.Module, adapter: MoEAdapter, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last decoder layer's output [B, S, H] of an in-memory model's forward on `inputs` (ids and mask already
    on the model's device): every decoder layer runs once, the head on one position (`logits_to_keep=1`) where the
    class takes it. `head_logits` turns it into logits, any positions at a time. Runs in the caller's grad mode
    (under `enable_grad` the result keeps its graph back through the layers: HEAPr's in-memory backward)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, output) -> None:
        seen["hidden"] = output[0] if isinstance(output, tuple) else output  # [B, S, H]

    one = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    hook = adapter.decoder_layers(model)[-1].register_forward_hook(keep)
    try:
        model(**inputs, use_cache=False, **one)
    finally:
        hook.remove()
    return seen["hidden"]


def head_logits(model: nn.Module, adapter: MoEAdapter, inputs: dict[str, torch.Tensor],
                hidden: torch.Tensor, logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, S, V] from the last decoder layer's output `hidden` [B, S, H] through the model's own final norm,
    head and logit post-processing (its forward, with every decoder layer returning `hidden`); with
    `logits_to_keep` ([c] positions, for model classes that take it) only those positions' logits [B, c, V]."""
    keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    with layers_return(model, adapter, hidden):
        out = model(**inputs, use_cache=False, **keep)
    return out.logits.float()  # [B, S or c, V]


@contextmanager
def around_layers_on(model: nn.Module, layers: nn.ModuleList, device: str) -> Iterator[None]:
    """Every materialised module outside the decoder layers on `device`, then back (a lazy model's layers, and its
    head unless loaded, stay on meta). Capturing there computes the rotary cos/sin as a model loaded on `device`
    does: a CPU's differ from a GPU's by an ulp, enough to flip near-tied routing decisions (measured: 0.2 % of the
    expert assignments of a random 12-layer model)."""
    moved: list[tuple[nn.Module, torch.device]] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            tensors = list(child.parameters()) + list(child.buffers())
            if child is layers or not tensors:
                continue
            if any(m is layers for m in child.modules()) or any(t.is_meta for t in tensors):
                visit(child)
            else:
                moved.append((child, tensors[0].device))

    visit(model)
    try:
        for module, _ in moved:
            module.to(device)
        yield
    finally:
        for module, home in moved:
            module.to(home)

"""One calibration run: every calibration set through the model layer by layer, routed statistics per set.

All sets travel together, so each decoder layer is loaded (and moved to the device) once whatever the number of
sets. Per MoE layer a `RoutedCollector` wraps the experts; before each batch it is pointed at that batch's set and
non-padding mask and probe-token mask (every `probe_stride`-th real token of each row: all experts' outputs are
recorded there for merge grouping). The experts run the model's configured implementation (transformers 5:
`grouped_mm` by default, the kernel a plain forward uses), so the pass costs a forward plus the statistics;
`eager=True` forces the per-expert reference loop (`config._experts_implementation = "eager"`) instead. Both
compute the same f_j(t) up to float rounding (tests/test_routed_stats.py checks either against weights by hand).

Optional `decide(model, adapter, layer, stats, block_io)` turns the run into prune-as-you-go: it returns the experts to
drop from that layer, and the layer is re-run with them masked in the model's own router before the next layer
sees its outputs (NAEE's progressive variant; any criterion can use it); the re-run recomputes the routed experts
only on the tokens whose route the mask changed, the others get their calibration-pass output
(`calibration/expert_replay.py`), and what the layer computes before its MoE block (norms, attention) is answered
from the pass (`calibration/before_block.py`). With `trace=True` the same pass also keeps
every sequence's routing per MoE layer (top-k indices of its real tokens, in order) for local-consistency analysis.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.calibration.before_block import BeforeBlock
from moeprune.calibration.data import CalibSet
from moeprune.calibration.engine import (
    LayerInputs,
    around_layers_on,
    cache_home,
    capture,
    run_layers,
    run_one,
    to_device,
)
from moeprune.calibration.expert_replay import ExpertReplay
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_experts
from moeprune.stats.routed import RoutedCollector, RoutedStats, default_probe_stride, probe_mask


@dataclass
class BlockIO:
    """Cached MoE-block inputs X and outputs Z of one layer, per batch ([B, S, H] each), and the real-token mask."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    valid: list[torch.Tensor] = field(default_factory=list)  # [B, S] bool
    tags: list[str] = field(default_factory=list)  # calibration set of each batch
    # for a decider that asks (`decide.routed_stride(real_tokens)`): per batch the routed experts [r_b, k] and their
    # outputs at gate weight 1 [r_b, k, H] of every `routed_stride`-th real token (counted across the layer's
    # batches in order), as the statistics collector computed them (`RoutedCollector.keep_slots`)
    routed: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    routed_stride: int = 0  # 0: nothing recorded


Decide = Callable[[nn.Module, MoEAdapter, int, dict[str, RoutedStats], BlockIO], list[int]]


def strided_rows(valid: torch.Tensor, seen: int, stride: int) -> tuple[torch.Tensor, int]:
    """valid [T] bool (real tokens of one batch), `seen` real tokens in the batches before -> (keep [T] bool: every
    `stride`-th real token, counted across the batches in order; seen + this batch's real tokens). The tokens NAEE's
    precompute keeps (`select/naee_outputs.expert_outputs`) and whose routed outputs the pass records for it."""
    pos = seen + torch.cumsum(valid.long(), 0) - 1  # [T] index among the real tokens so far
    return valid & (pos % stride == 0), seen + int(valid.sum())


@dataclass
class CollectResult:
    stats: dict[str, dict[int, RoutedStats]]  # set name -> MoE layer -> sums
    router_sha256: str
    dropped: dict[int, list[int]] = field(default_factory=dict)  # prune-as-you-go decisions
    # with trace=True: set name -> MoE layer -> one LongTensor [n_real_tokens, k] per sequence (real tokens, in order)
    traces: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=dict)


@contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """Force the experts' eager implementation (transformers dispatches on config._experts_implementation)."""
    config = model.config
    before = getattr(config, "_experts_implementation", None)
    if before is None or before == "eager":
        yield
        return
    config._experts_implementation = "eager"
    try:
        yield
    finally:
        config._experts_implementation = before


def make_batches(model: nn.Module, adapter: MoEAdapter, sets: list[CalibSet], batch_size: int,
                 device: str = "cpu", max_batches: int | None = None) -> list[LayerInputs]:
    """Capture layer-0 inputs and every layer's kwargs for `batch_size` rows at a time of every set, with the
    modules around the decoder layers on `device` (`engine.around_layers_on`). Hidden states and kwargs wait on
    `device` when every batch's hidden states fit there (`engine.cache_home`: a GPU run then copies nothing
    between host and device per layer), else on CPU; a tensor the layers share (rotary cos/sin, masks) is kept
    once per batch. `max_batches`: only the first that many batches (set by set, in order)."""
    batches: list[LayerInputs] = []
    home: str | None = None  # where batches wait: decided from the first batch's bytes per token
    tokens = sum(s.input_ids.numel() for s in sets)
    with around_layers_on(model, adapter.decoder_layers(model), device):
        for s in sets:
            for start in range(0, s.input_ids.shape[0], batch_size):
                if max_batches is not None and len(batches) >= max_batches:
                    return batches
                ids = s.input_ids[start : start + batch_size]  # [B, L]
                mask = s.attention_mask[start : start + batch_size]  # [B, L]
                b = capture(model, adapter, ids, mask, keep_on=home or "cpu")
                if home is None:
                    home = cache_home(device, b.hidden.nbytes // max(1, ids.numel()) * tokens)
                    b.hidden = b.hidden.to(home)
                b.kwargs = to_device(b.kwargs, home, memo={})
                b.tag = s.name
                batches.append(b)
    return batches


@torch.no_grad()
def collect(
    model: nn.Module,
    adapter: MoEAdapter,
    sets: list[CalibSet],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    layer_context: Callable[[int], AbstractContextManager] | None = None,
    decide: Decide | None = None,
    probe_stride: int | None = None,
    trace: bool = False,
    eager: bool = False,
) -> CollectResult:
    """Routed statistics of every set (and, with `trace`, every sequence's top-k routing per MoE layer); `eager`
    forces the per-expert reference loop instead of the model's configured experts kernel."""
    moe = set(adapter.moe_layers())
    kind = adapter.routing().kind
    first = adapter.block(model, min(moe))  # on meta in a lazy model: shapes only
    hidden = int(adapter.expert_roles(first)["down"].shape[1])  # the experts' output width ([E, H, I] canonical)
    stats = {s.name: {layer: RoutedStats(adapter.num_experts, hidden=hidden).to(device) for layer in sorted(moe)}
             for s in sets}  # sums live on the device during the pass; moved to the host once at the end
    stride = probe_stride or default_probe_stride(adapter.num_experts, adapter.top_k)
    router_hash = hashlib.sha256()
    result = CollectResult(stats, "")
    if trace:
        result.traces = {s.name: {layer: [] for layer in sorted(moe)} for s in sets}
    current: dict[str, RoutedCollector | None] = {"collector": None}  # the active layer's collector
    replay: dict[int, ExpertReplay] = {}  # prune-as-you-go: the active layer's recorded experts calls
    before: dict[int, BeforeBlock] = {}  # and what it computes before its MoE block (`calibration/before_block.py`)
    io = BlockIO()
    wants = getattr(decide, "routed_stride", None)  # the decider reuses the pass's routed outputs (NAEE)
    if wants is not None:
        io.routed_stride = wants(sum(int(s.attention_mask.sum()) for s in sets))
    seen = [0]  # real tokens of the current layer's batches so far
    on_cuda = torch.device(device).type == "cuda"

    def on_layer(i: int, layer: nn.Module):
        if i not in moe:
            current["collector"] = None
            return None
        block = adapter.block(model, i)
        router = adapter.router(block)
        for t in adapter.router_tensors(block).values():
            router_hash.update(t.detach().float().cpu().numpy().tobytes())
        col = RoutedCollector(adapter.experts(block), stats[sets[0].name][i], router, kind, block=block,
                              top_k=adapter.top_k, logits_at=adapter.router_logits_at,
                              extra_classes=adapter.extra_classes).__enter__()
        col.layer = i
        if io.routed_stride:
            col.keep_slots = io.routed
            seen[0] = 0
        current["collector"] = col
        hook = block.register_forward_hook(_record_io) if decide is not None else None
        recordings = []
        if decide is not None:
            replay.clear()
            replay[i] = ExpertReplay(adapter.experts(block))
            before[i] = BeforeBlock(layer, block)
            recordings = [replay[i].record(), before[i].record()]
            for r in recordings:
                r.__enter__()

        def cleanup() -> None:
            col.__exit__(None, None, None)
            if hook is not None:
                hook.remove()
            for r in reversed(recordings):
                r.__exit__(None, None, None)

        return cleanup

    def _record_io(module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        io.inputs.append(args[0].detach().cpu())
        io.outputs.append(out.detach().cpu())

    def on_batch(b: LayerInputs) -> None:
        col = current["collector"]
        if col is not None:
            col.stats = stats[b.tag][col.layer]
            valid = b.attention_mask.reshape(-1).bool()  # [T]
            if on_cuda and valid.device.type == "cpu":
                valid = valid.pin_memory().to(device, non_blocking=True)  # page-locked: an asynchronous copy
            col.valid = valid
            col.probe = probe_mask(b.attention_mask.cpu(), stride)  # [T] on the host: indices without a sync
            if trace:
                col.trace, col.rows = result.traces[b.tag][col.layer], b.attention_mask
            io.valid.append(b.attention_mask.bool())
            io.tags.append(b.tag)
            if col.keep_slots is not None:  # every routed_stride-th real token of the layer, as the decider keeps
                keep, seen[0] = strided_rows(b.attention_mask.reshape(-1).bool().cpu(), seen[0], io.routed_stride)
                col.keep_rows = keep.nonzero().view(-1)  # [r] on the host

    with eager_experts(model) if eager else nullcontext():
        batches = make_batches(model, adapter, sets, batch_size, device)
        layers = adapter.decoder_layers(model)
        for i, outputs in run_layers(model, adapter, batches, device=device, on_layer=on_layer,
                                     layer_context=layer_context, on_batch=on_batch):
            if i in moe and decide is not None:
                drop = sorted(decide(model, adapter, i, {name: stats[name][i] for name in stats}, io))
                if current["collector"] is not None:
                    current["collector"].keep_slots = None  # the re-run below records nothing
                io.routed.clear()
                if drop:
                    result.dropped[i] = drop
                    with masked_experts(model, adapter, {i: drop}), replay[i].replaying(), before[i].replaying():
                        outputs[:] = run_one(layers[i], i, batches, device, cache_device=str(outputs[0].device))
                    logger.debug("layer %d re-run: routed experts recomputed on %d of %d rows", i,
                                 replay[i].recomputed, replay[i].rows)
            replay.clear()
            before.clear()
            for cache in (io.inputs, io.outputs, io.valid, io.tags, io.routed):
                cache.clear()
    for per_layer in stats.values():
        for st in per_layer.values():
            st.to("cpu")  # one device->host copy per layer and set, after the pass
    result.router_sha256 = router_hash.hexdigest()
    return result

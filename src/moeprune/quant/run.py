"""Quantize a model's targets, one decoder layer at a time: RTN, or GPTQ on the calibration engine's batches.

    RTN:   every target W -> (q, s, z) = rtn.quantize(W)                                      (no data)
    GPTQ:  batches = the calibration sets at decoder layer 0 (`calibration/session.py:make_batches`)
           for decoder layer i:
               Hessians of its targets on the batches (`hessian.py`; routed experts: their own tokens only)
               every target: GPTQ with its Hessian; a routed expert with fewer than `min_tokens` routed tokens
               falls back to RTN (listed in the summary); Ŵ written into the layer
               batches <- layer i (quantized) on the batches        (the next layer sees the quantized stream)
The result holds (q, s, z) per target (`targets.py` keys) and the bits of each.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.calibration.data import CalibSet
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.quant.gptq import Quantized, gptq
from moeprune.quant.hessian import layer_hessians
from moeprune.quant.rtn import dequantize, quantize
from moeprune.quant.scheme import QuantScheme
from moeprune.quant.targets import Target, find_targets, weight_of

LayerContext = Callable[[int], AbstractContextManager]


@dataclass
class QuantResult:
    tensors: dict[str, Quantized] = field(default_factory=dict)  # target key -> q, scale, zero
    bits: dict[str, int] = field(default_factory=dict)  # target key -> bits
    parts: dict[str, str] = field(default_factory=dict)  # target key -> part
    fallbacks: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> experts quantized by RTN
    tokens: dict[int, dict[int, int]] = field(default_factory=dict)  # MoE layer -> expert -> routed tokens


def _nothing(i: int) -> AbstractContextManager:
    return nullcontext()


def _rtn(w: torch.Tensor, scheme: QuantScheme) -> Quantized:
    return Quantized(*quantize(w.detach(), scheme))


@torch.no_grad()
def _write(w: torch.Tensor, r: Quantized, scheme: QuantScheme) -> None:
    w.copy_(dequantize(r.q, r.scale, r.zero, scheme.group_size).to(w.dtype))


@torch.no_grad()
def quantize_model(model: nn.Module, adapter: MoEAdapter, scheme: QuantScheme, bits_of: Callable[[Target], int], *,
                   algorithm: str = "rtn", sets: list[CalibSet] | None = None, min_tokens: int = 16,
                   damp: float = 0.01, act_order: bool = False, batch_size: int = 8, device: str = "cpu",
                   layer_context: LayerContext | None = None, store_dtype: torch.dtype | None = None) -> QuantResult:
    """(q, s, z) of every target of `scheme.parts` (module docstring). GPTQ writes Ŵ into `model` as it goes.
    `store_dtype`: the dtype the checkpoint stores weights in (scales are computed and kept in it); default: the
    weight's own."""
    context = layer_context or _nothing
    result = QuantResult()
    n = len(adapter.decoder_layers(model))
    moe = set(adapter.moe_layers())
    batches = None
    if algorithm == "gptq":
        from moeprune.calibration.session import make_batches

        batches = make_batches(model, adapter, sets, batch_size, device)
    for i in (bar := tqdm(range(n), leave=False)):
        bar.set_description(f"quantize {algorithm} w{scheme.bits} (layer {i + 1}/{n})")
        with context(i):
            layer = adapter.decoder_layers(model)[i]
            targets = find_targets(model, adapter, scheme.parts, layers=[i])
            if algorithm == "gptq":
                home = next(layer.parameters()).device
                layer.to(device)
                _gptq_layer(model, adapter, layer, i, i in moe, targets, batches, scheme, bits_of, result,
                            min_tokens, damp, act_order, device, store_dtype)
                from moeprune.repair.capture import layer_output

                outs = [layer_output(layer, b, i, device, carry=True) for b in batches]
                layer.to(home)
                for b, out in zip(batches, outs, strict=True):
                    b.hidden = out
            else:
                for t in targets:
                    s = scheme.with_bits(bits_of(t))
                    w = weight_of(model, adapter, t)
                    _keep(result, t, _rtn(w.to(store_dtype or w.dtype), s), s)
    return result


def _keep(result: QuantResult, t: Target, r: Quantized, scheme: QuantScheme) -> None:
    result.tensors[t.key], result.bits[t.key], result.parts[t.key] = r, scheme.bits, t.part


def _gptq_layer(model, adapter, layer, i, is_moe, targets, batches, scheme, bits_of, result, min_tokens, damp,
                act_order, device, store_dtype) -> None:
    modules = [t.name for t in targets if t.expert is None]
    block = adapter.block(model, i) if is_moe else None
    hess = layer_hessians(layer, block, adapter, batches, i, device, modules)
    if is_moe:
        result.tokens[i] = {j: hess.tokens.get(j, 0) for j in range(adapter.num_experts)}
    for t in targets:
        s = scheme.with_bits(bits_of(t))
        w = weight_of(model, adapter, t)
        w_stored = w.detach().cpu().to(store_dtype or w.dtype)  # the checkpoint's values (scales in its dtype)
        if t.expert is not None:
            if hess.tokens.get(t.expert, 0) < min_tokens:
                r = _rtn(w_stored, s)
                listed = result.fallbacks.setdefault(i, [])
                if t.expert not in listed:
                    listed.append(t.expert)
            else:
                H = hess.expert_down[t.expert] if t.name == "down" else hess.expert_in[t.expert]
                r = gptq(w_stored, H.cpu(), s, damp=damp, act_order=act_order)
        else:
            r = gptq(w_stored, hess.modules[t.name].cpu(), s, damp=damp, act_order=act_order)
        _write(w, r, s)  # the next targets' Hessians were taken before; the next layer sees Ŵ
        _keep(result, t, r, s)
    if result.fallbacks.get(i):
        logger.info("layer %d: experts %s saw fewer than %d routed tokens: RTN", i, result.fallbacks[i], min_tokens)

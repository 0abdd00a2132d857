"""GPTQ Hessians of one decoder layer from the calibration engine's batches, per routed expert from its tokens only.

For decoder layer i and the real (non-padding) tokens of every batch (`repair/capture.py:experts_calls` records the
experts call: input x [T, H], top-k indices idx [T, k]):

    routed expert j, A_j = {t : j ∈ idx_t}:
        H_in[j]   = 2 Σ_{t∈A_j} x_t x_tᵀ            [H, H]   (gate and up projections)
        H_down[j] = 2 Σ_{t∈A_j} h_t h_tᵀ            [I, I]   h_t = act(gate x_t) · up x_t, the down projection's
                                                             input (`repair/fixes.py:activation`, the family's GLU)
        n_j = |A_j|
    any other quantized Linear m (shared experts, attention):  H_m = 2 Σ_t u_t u_tᵀ over its inputs u_t
Float64 sums, computed with the layer's weights before it is quantized (one pass per layer).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.calibration.engine import LayerInputs, call_layer
from moeprune.models.base import MoEAdapter
from moeprune.repair.capture import experts_calls
from moeprune.repair.fixes import activation


@dataclass
class LayerHessians:
    expert_in: dict[int, torch.Tensor] = field(default_factory=dict)  # j -> [H, H]
    expert_down: dict[int, torch.Tensor] = field(default_factory=dict)  # j -> [I, I]
    tokens: dict[int, int] = field(default_factory=dict)  # j -> routed tokens n_j
    modules: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> [in, in]


def _add(store: dict, key, x: torch.Tensor) -> None:
    x = x.double()
    store[key] = store.get(key, 0) + 2 * x.T @ x


@torch.no_grad()
def layer_hessians(layer: nn.Module, block: nn.Module | None, adapter: MoEAdapter, batches: list[LayerInputs],
                   i: int, device: str, modules: list[str]) -> LayerHessians:
    """The Hessians of decoder layer i (module docstring); `block` None: not a MoE layer (modules only)."""
    out = LayerHessians()
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, args):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])  # [B·S, in]
        return record

    with ExitStack() as stack:
        for name in modules:
            handle = layer.get_submodule(name).register_forward_pre_hook(hook(name))
            stack.callback(handle.remove)
        calls = stack.enter_context(experts_calls(adapter.experts(block))) if block is not None else {}
        for b in batches:
            seen.clear()
            call_layer(layer, b.hidden.to(device), b.kwargs[i], device)
            valid = b.attention_mask.reshape(-1).bool()  # [B·S]
            for name, x in seen.items():
                _add(out.modules, name, x[valid.to(x.device)])
            if block is None:
                continue
            x, idx = calls["x"][valid.to(calls["x"].device)], calls["idx"][valid.to(calls["idx"].device)]
            for j in idx.unique().tolist():
                if j >= adapter.num_experts:  # weightless extra router classes (zero experts)
                    continue
                tok = (idx == j).any(-1)  # [T] tokens routed to j
                xj = x[tok]  # [n_j, H]
                _add(out.expert_in, j, xj)
                _add(out.expert_down, j, activation(adapter, block, j, xj))
                out.tokens[j] = out.tokens.get(j, 0) + int(tok.sum())
    return out

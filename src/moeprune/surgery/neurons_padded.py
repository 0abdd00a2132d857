"""Neuron surgery for plans whose experts keep different numbers of neurons (`layer` / `global` budgets).

Each MoE layer l gets one width I_l = the most neurons any of its experts keeps, rounded up to a multiple of
`align` (≤ I). Expert j keeps its K_j neurons first and is padded to I_l with *zero neurons* (gate/up rows and
down column all zero: h = glu(0, 0) = 0 for SwiGLU and gpt-oss alike, and a zero down column adds nothing), so
the function is exactly that of the masked original. Implementation: append one zero neuron (index I) to every
expert, then slice with index rows K_j + [I, I, ...] through `FusedLayout.take_neurons`.
The config keeps the original width; `io/nonuniform.py` records I_l per layer and saves/loads the folder.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.models.fused_styles import style_of
from moeprune.models.layouts import FusedLayout, layout_of
from moeprune.select.neuron_plan import NeuronPlan
from moeprune.surgery.neurons import _prepare, _set_width_attrs


def layer_widths(plan: NeuronPlan, align: int) -> dict[int, int]:
    """I_l = max_j |K_j| rounded up to a multiple of `align`, at most the original width."""
    out = {}
    for layer, experts in plan.kept_neurons.items():
        n = max(len(v) for v in experts.values())
        out[layer] = min(plan.width, -(-n // align) * align)
    return out


def check_padded(model: nn.Module, adapter: MoEAdapter, plan: NeuronPlan, layers: list[int]) -> None:
    """Refuse experts not stored fused 3-D (non-uniform widths are stored for fused experts only)."""
    for layer in layers:
        layout = layout_of(adapter.experts(adapter.block(model, layer)))
        if layout is not FusedLayout:
            raise MoePruneError("non-uniform neuron widths are supported for fused experts only (this model "
                                f"stores its experts as {layout.name!r}); use --budget expert.")


@torch.no_grad()
def pad_layer(model: nn.Module, adapter: MoEAdapter, plan: NeuronPlan, layer: int, align: int = 8) -> None:
    """Slice decoder layer `layer`'s experts to the layer's width I_l, narrower experts zero-padded (no-op for a
    layer the plan does not list). The config keeps the original width."""
    if layer not in plan.kept_neurons:
        return
    inter = plan.width
    experts = adapter.experts(adapter.block(model, layer))
    W, E = layer_widths(plan, align)[layer], len(plan.kept_neurons[layer])
    idx = torch.full((E, W), inter, dtype=torch.long)  # [E, I_l]; index `inter` = the zero neuron
    for j in range(E):
        kept = plan.kept_neurons[layer][j]
        idx[j, : len(kept)] = torch.tensor(kept, dtype=torch.long)
    style_of(experts, adapter.fused_style).append_zero_neuron(experts)  # width I + 1, neuron I all zeros
    FusedLayout.take_neurons(experts, adapter.fused_style, idx)
    _set_width_attrs(experts, inter, W)


@torch.no_grad()
def apply_neuron_plan_padded(model: nn.Module, adapter: MoEAdapter, plan: NeuronPlan, *,
                             align: int = 8) -> dict[int, int]:
    """Slice every MoE layer to its own width I_l (experts zero-padded to it), in place; returns {layer: I_l}."""
    _prepare(model, adapter, plan)
    check_padded(model, adapter, plan, plan.layers)
    for layer in plan.layers:
        pad_layer(model, adapter, plan, layer, align)
    return layer_widths(plan, align)

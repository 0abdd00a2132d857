"""Intra-expert (neuron-level) surgery on an in-memory model: the tensors really shrink.

Neuron k of routed expert j is row k of gate and up and column k of down (canonical gate/up [E, I, H],
down [E, H, I]); the expert computes  y = Σ_k down[:, k] · h_k (+ down bias),  h_k = act(gate_k·x) · (up_k·x).
For kept neurons K_j (ascending, |K_j| = I' for every expert), expert by expert:

  fused (every style of `models/fused_styles.py`: concatenated or interleaved gate/up, transposed or not, gated
  or up-only): the input projection keeps neurons K_j on its 2I (or I) axis, gate and up alike, with its bias;
  down_proj keeps the same neurons on its I axis; down_proj_bias [E, H] is unchanged. E.g. "concat":
      gate_up_proj [E, 2I, H] -> [E, 2I', H] rows K_j then I + K_j;  down_proj [E, H, I] -> [E, H, I'] columns K_j
  modulelist (`experts.J.gate_proj/up_proj/down_proj` or `w1/w3/w2` nn.Linear):
      gate, up weight [I, H] -> [I', H] (bias [I] -> [I']);  down weight [H, I] -> [H, I'];  in/out_features follow

Afterwards I' is written to `config.<adapter.intermediate_key>` (text sub-config when nested) and to every
integer attribute in `WIDTH_ATTRS` equal to I on the experts container and its expert MLPs
(transformers 5: `intermediate_dim` on the fused experts of the concat families, `intermediate_size` on gpt-oss
experts and on ModuleList MLPs). Configs that size the shared experts from the routed width (DeepSeek
moe_intermediate_size × n_shared_experts = S, afmoe `num_shared_experts`, aria / ernie `moe_num_shared_experts`,
...) get that companion key rewritten to S / I', which must be an integer (else the plan is refused); the key is
found on the meta model (`models/coupling.py`), so the export reloads in stock transformers.

Kept widths must be multiples of `align` (default 8): transformers' default `grouped_mm` experts kernel needs every
activation row [·, I'] to span a multiple of 16 bytes, i.e. I' % 8 == 0 in bf16/fp16 (I' % 4 in fp32), else a
stock model fails at its first forward ("strides should be multiple of 16 bytes"). `align=1` lifts the check for
models run with `experts_implementation="eager"`.

`mask_neurons` is the reference: it zeroes only the down columns of removed neurons, which removes exactly their
terms down[:, k] · h_k, so it computes the sliced model's function (up to summation order).
Only uniform plans can be sliced (stock configs hold one width); non-uniform widths need moeprune's own loader.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.models.fused_styles import replace_param
from moeprune.models.keys import get_key
from moeprune.models.layouts import WIDTH_ATTRS, ModuleListLayout, layout_of, mlp_name
from moeprune.select.neuron_plan import NeuronPlan


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _slice_modulelist(experts: nn.ModuleList, idx: torch.Tensor) -> None:
    for j, expert in enumerate(experts):
        keep = idx[j]
        for role in ("gate", "up"):
            lin = getattr(expert, mlp_name(expert, role))
            replace_param(lin, "weight", lin.weight.index_select(0, keep.to(lin.weight.device)))  # [I', H]
            if lin.bias is not None:
                replace_param(lin, "bias", lin.bias.index_select(0, keep.to(lin.bias.device)))  # [I']
            lin.out_features = len(keep)
        lin = getattr(expert, mlp_name(expert, "down"))
        replace_param(lin, "weight", lin.weight.index_select(1, keep.to(lin.weight.device)))  # [H, I']
        lin.in_features = len(keep)


def _set_width_attrs(experts: nn.Module, old: int, new: int) -> list[str]:
    modules = list(experts.modules())  # the container, its expert MLPs or the module holding flat tensors
    changed = []
    for m in modules:
        for a in WIDTH_ATTRS:
            if isinstance(getattr(m, a, None), int) and getattr(m, a) == old:
                setattr(m, a, new)
                changed.append(f"{type(m).__name__}.{a}")
    return sorted(set(changed))


def companions(config, adapter: MoEAdapter, new: int, align: int) -> dict[str, int]:
    """Config values that keep the shared experts' (and every other non-routed tensor's) shape at width I' = new
    (`models/coupling.py`): {} when nothing else is sized from the width."""
    from moeprune.models.coupling import companion_updates, routed_pattern

    routed = routed_pattern(adapter.block_name, adapter.experts_name)
    return companion_updates(config, adapter.intermediate_key, new, routed, align)


def _prepare(model: nn.Module, adapter: MoEAdapter, plan: NeuronPlan) -> None:
    old = get_key(text_config(model.config), adapter.intermediate_key)
    if old != plan.width:
        raise MoePruneError(f"config {adapter.intermediate_key}={old} but the neuron plan was made for width "
                            f"{plan.width}.")
    plan.validate(adapter, model)


def check_uniform(config, adapter: MoEAdapter, plan: NeuronPlan, align: int) -> dict[str, int]:
    """Every refusal of `apply_neuron_plan` that needs no tensor (uniform width, alignment, shared-expert coupling);
    returns the companion config values to write with the new width ({} when none, see `companions`)."""
    new = plan.uniform_width
    if new is None:
        widths = sorted({len(v) for ex in plan.kept_neurons.values() for v in ex.values()})
        raise MoePruneError(
            f"the neuron plan keeps different widths per expert ({widths[0]}..{widths[-1]}); stock configs hold one "
            "expert width, so non-uniform widths need moeprune's own loader (written by apply_neuron_plan_padded, "
            "loaded by moeprune.load_model); here use a uniform budget."
        )
    old = plan.width
    if new != old and new % align:
        lo = new - new % align
        near = [w for w in (lo, lo + align) if 0 < w <= old]
        raise MoePruneError(
            f"kept width {new} is not a multiple of {align}: transformers' default grouped_mm experts kernel needs "
            f"activation rows of a multiple of 16 bytes (width % 8 == 0 in bf16), so the pruned model would fail at "
            f"its first forward. Keep a multiple of {align} neurons per expert (nearest: {near}), or pass align=1 "
            "and run the model with experts_implementation='eager'."
        )
    return companions(config, adapter, new, align)


@torch.no_grad()
def slice_layer(model: nn.Module, adapter: MoEAdapter, plan: NeuronPlan, layer: int) -> list[str]:
    """Keep only the plan's neurons in decoder layer `layer`'s routed experts (no-op for a layer the plan does not
    list); returns the width attributes changed. Config untouched; `check_uniform` must have passed."""
    if layer not in plan.kept_neurons:
        return []
    experts = adapter.experts(adapter.block(model, layer))
    E = len(plan.kept_neurons[layer])
    idx = torch.tensor([plan.kept_neurons[layer][j] for j in range(E)], dtype=torch.long)  # [E, I']
    layout = layout_of(experts)
    if layout is ModuleListLayout:
        _slice_modulelist(experts, idx)
    else:  # fused (through its style, `models/fused_styles.py`) or flat
        layout.take_neurons(experts, adapter.fused_style, idx)
    return _set_width_attrs(experts, plan.width, plan.uniform_width)


def set_neuron_config(config, adapter: MoEAdapter, plan: NeuronPlan, extra: dict[str, int]) -> None:
    """The config once a uniform plan is applied: the new width and its companion keys (module docstring)."""
    adapter.set_config_width(config, plan.uniform_width)
    for key, value in extra.items():
        setattr(text_config(config), key, value)


@torch.no_grad()
def apply_neuron_plan(model: nn.Module, adapter: MoEAdapter, plan: NeuronPlan, *, align: int = 8) -> nn.Module:
    """Keep only the plan's neurons in every routed expert, in place: `slice_layer` on every MoE layer, then the
    config once. Every check (plan shape, uniform width, alignment, shared-expert coupling) runs before any tensor
    is modified.
    """
    _prepare(model, adapter, plan)
    extra = check_uniform(model.config, adapter, plan, align)
    old, new = plan.width, plan.uniform_width
    changed: set[str] = set()
    for layer in plan.layers:
        changed.update(slice_layer(model, adapter, plan, layer))
    for key, value in extra.items():
        logger.info("%s: %s %d -> %d so the shared experts keep their width", adapter.model_type, key,
                    getattr(text_config(model.config), key), value)
    set_neuron_config(model.config, adapter, plan, extra)
    logger.info("kept %d of %d neurons per expert in %d MoE layers (width attributes: %s)", new, old,
                len(plan.layers), ", ".join(sorted(changed)) or "none")
    return model


@torch.no_grad()
def mask_neurons(model: nn.Module, adapter: MoEAdapter, plan: NeuronPlan) -> nn.Module:
    """Reference for `apply_neuron_plan`: zero the down-projection columns of removed neurons, in place.

    Nothing else changes (gate/up rows, biases, the down bias stay), so any plan — uniform or not — is accepted.
    """
    _prepare(model, adapter, plan)
    for layer in plan.layers:
        experts = adapter.experts(adapter.block(model, layer))
        layout = layout_of(experts)
        modulelist = layout is ModuleListLayout
        for j in sorted(plan.kept_neurons[layer]):
            drop = plan.dropped(layer, j)
            if not drop:
                continue
            if modulelist:
                getattr(experts[j], mlp_name(experts[j], "down")).weight[:, drop] = 0  # [H, I]
            else:
                layout.roles(experts, adapter.fused_style)["down"][j][:, drop] = 0  # view [H, I]
    return model

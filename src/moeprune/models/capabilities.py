"""Which verbs a family's layout allows, decided in one place (used by `moeprune info` and by the stages, which
raise `UnsupportedLayout` with the same reason before any work).

Verbs: `experts` (criterion expert removal, in memory and streaming), `naee` (NAEE's reconstruction search),
`neurons` (HEAPr, CAMERA-P), `merge` (M-SMoE, HC-SMoE, Sub-MoE, DERN), `repair` (closed-form repair and
distillation: new values for expert and router tensors), `lazy` (layer-by-layer loading). A problem
is a sentence saying why the verb cannot run; None means supported. The checks read the experts module (meta is
enough: shapes and flags).
"""

from __future__ import annotations

from torch import nn

from moeprune.errors import UnsupportedLayout
from moeprune.models.base import MoEAdapter
from moeprune.models.layouts import FusedLayout, ModuleListLayout, layout_of

VERBS = ("experts", "naee", "neurons", "merge", "repair", "lazy")


def _experts_problem(adapter: MoEAdapter, experts: nn.Module) -> str | None:
    """Why the expert weights cannot be handled neuron by neuron (neurons, merge), or None."""
    if adapter.expert_width is None:
        return f"the config has no expert width under {adapter.intermediate_key!r}"
    if layout_of(experts) is ModuleListLayout:
        return None
    if getattr(experts, "has_post_expert_norm", False):
        return f"{type(experts).__name__} normalises each expert's output, which neuron and merge surgery do not model"
    return None


def _width_problem(adapter: MoEAdapter) -> str | None:
    """Why a stock config cannot describe a narrower expert width (the width key also sizes other tensors and no
    companion key compensates, `models/coupling.py`), or None."""
    from moeprune.errors import MoePruneError
    from moeprune.models.coupling import companion_keys, routed_pattern

    try:
        coupled, keys = companion_keys(adapter.root_config, adapter.intermediate_key,
                                       routed_pattern(adapter.block_name, adapter.experts_name))
    except MoePruneError:
        return None  # the stock class cannot be built here (remote code): decided when the model is loaded
    if coupled and not keys:
        return (f"{adapter.intermediate_key} also sizes {sorted(coupled)[0]} (and no config key compensates), so a "
                "stock config cannot describe a narrower expert width")
    return None


def _naee_problem(adapter: MoEAdapter, experts: nn.Module) -> str | None:
    """NAEE's search replays the MoE block on cached inputs with every expert's output computed once
    (`select/naee_outputs.py`): blocks it cannot replay that way are refused (measured on the tiny models)."""
    from moeprune.models.layouts import FlatLayout
    from moeprune.stats.prescaled import is_prescaled

    if not adapter.block_name:
        return "the MoE block is the decoder layer itself (Gemma-4); NAEE's block replay does not support that yet"
    if getattr(adapter, "extra_classes", 0):
        return "the router has weightless extra classes (zero experts); NAEE's output cache does not support them yet"
    if layout_of(experts) is FlatLayout:
        return "flat [E·I, H] experts (DBRX) are not read by NAEE's output cache yet"
    if is_prescaled(experts):
        return "the block pre-scales the experts' input (Llama-4); NAEE's output cache does not support that yet"
    hidden = getattr(adapter.config, "hidden_size", None)
    if hidden is not None and layout_of(experts).roles(experts, adapter.fused_style)["up"].shape[-1] != hidden:
        return ("the experts see a projection of the block input (MuseSpark pre_expert_proj); NAEE's output cache "
                "does not support that yet")
    return None


def _merge_problem(adapter: MoEAdapter, experts: nn.Module) -> str | None:
    """Merging aligns and averages gate, up and down: up-only experts are not supported yet."""
    from moeprune.models.fused_styles import style_of

    if layout_of(experts) is FusedLayout and not style_of(experts, adapter.fused_style).gated:
        return (f"{type(experts).__name__} has up-only experts (y = down·act(up·x)); merging aligns and averages "
                "gate, up and down")
    return None


def _repair_problem(adapter: MoEAdapter, experts: nn.Module) -> str | None:
    """Repair reads each token's routing off the experts module's call (hidden, top-k indices, top-k weights)."""
    from moeprune.stats.prescaled import is_prescaled

    if is_prescaled(experts):
        return "the block pre-scales the experts' input (Llama-4); repair reads unscaled routed inputs"
    if getattr(adapter, "extra_classes", 0):
        return "the router has weightless extra classes (zero experts); repair does not model them yet"
    return None


def problems(adapter: MoEAdapter, experts: nn.Module, config_dict: dict | None = None) -> dict[str, str | None]:
    """verb -> None (supported) or the reason it is not."""
    from moeprune.io.remote import is_remote

    weights = _experts_problem(adapter, experts)
    return {
        "experts": None,
        "naee": _naee_problem(adapter, experts),
        "neurons": weights or _width_problem(adapter),
        "merge": weights or _merge_problem(adapter, experts),
        "repair": weights or _repair_problem(adapter, experts),
        "lazy": "remote-code models are loaded whole" if config_dict is not None and is_remote(config_dict) else None,
    }


def meta_experts(adapter: MoEAdapter) -> nn.Module | None:
    """The experts module of the adapter's first MoE layer, on meta (None when the stock class cannot be built,
    e.g. remote code: its verbs are then decided when the model is loaded)."""
    from moeprune.errors import MoePruneError
    from moeprune.models.structure import meta_model

    try:
        model = meta_model(adapter.root_config)
        return adapter.experts(adapter.block(model, adapter.moe_layers()[0]))
    except (MoePruneError, IndexError):
        return None


def require(adapter: MoEAdapter, verb: str) -> None:
    """Raise UnsupportedLayout when the layout does not allow `verb` (checked on the meta model, before work)."""
    experts = meta_experts(adapter)
    why = None if experts is None else problems(adapter, experts).get(verb)
    if why:
        raise UnsupportedLayout(f"{adapter.family} ({adapter.model_type}) cannot run {verb} methods: {why}.")

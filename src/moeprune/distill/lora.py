"""LoRA adapters on the routed experts through `peft` (optional: `pip install 'moeprune[distill]'`), merged back
into plain dense weights before the plan is read.

    fused experts (transformers 5: 3-D nn.Parameter [E, out, in] or transposed [E, in, out])
        peft ≥ 0.17 `LoraConfig(target_parameters=[...])` (`ParamWrapper`): per expert e a rank-r pair,
        lora_A [r·E, in] and lora_B [out, r·E] (expert e: rows e·r.., and columns r·e.. of B viewed [out, r, E]),
        ΔW_e = (α / r) · B_e A_e, applied through a parametrization of the 3-D parameter (gate_up_proj and
        down_proj; 2-D expert biases are not adapted)
    module-list experts (nn.Linear per expert): peft `target_modules` = every expert Linear, ΔW = (α / r) · B A
    flat experts (DBRX [E·I, H]): refused — peft would treat the stack as one matrix, not one adapter per expert
`merge_and_unload()` writes W + ΔW into the base parameters and removes the wrappers: the model is the stock
model again, and the plan reads its experts like any other (`trainable.trained_values`).
"""

from __future__ import annotations

import warnings

from torch import nn

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.models.layouts import FusedLayout, ModuleListLayout, layout_of

INSTALL = "pip install 'moeprune[distill]' (or pip install 'peft>=0.17')"


def require_peft():
    """The peft module, or a clear error naming the install command (checked before any work)."""
    try:
        import peft
    except ImportError:
        raise MoePruneError(f"train lora uses peft, which is not installed: {INSTALL}; or train experts or routers "
                            "instead.") from None
    if "target_parameters" not in peft.LoraConfig.__dataclass_fields__:
        raise MoePruneError(f"train lora needs peft >= 0.17 (LoRA on fused 3-D expert parameters); found "
                            f"{peft.__version__}: {INSTALL}.")
    return peft


def layout_problem(experts: nn.Module) -> str | None:
    """Why LoRA adapters cannot be put on these routed experts, or None."""
    layout = layout_of(experts)
    if layout is FusedLayout or layout is ModuleListLayout:
        return None
    return (f"{type(experts).__name__} stores its experts as a {layout.name} stack; peft would adapt the whole stack "
            "as one matrix rather than each expert — train experts instead")


def lora_targets(model: nn.Module, adapter: MoEAdapter) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters): full names of every routed expert's Linear (module-list experts) or
    3-D weight parameter (fused experts)."""
    names = {id(m): n for n, m in model.named_modules()}
    modules, params = [], []
    for layer in adapter.moe_layers():
        experts = adapter.experts(adapter.block(model, layer))
        problem = layout_problem(experts)
        if problem:
            raise MoePruneError(f"train lora: {problem}.")
        prefix = names[id(experts)]
        if layout_of(experts) is ModuleListLayout:
            modules += [f"{prefix}.{n}" for n, m in experts.named_modules() if isinstance(m, nn.Linear)]
        else:
            params += [f"{prefix}.{n}" for n, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    return modules, params


def add_lora(model: nn.Module, adapter: MoEAdapter, rank: int, alpha: float):
    """Wrap `model` in place with LoRA adapters on its routed experts (B = 0: the function is unchanged); returns
    the PeftModel (its trainable parameters are the adapters only)."""
    peft = require_peft()
    modules, params = lora_targets(model, adapter)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=modules,
                             target_parameters=params or None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing rename, read by peft
        return peft.get_peft_model(model, config)


def merge_lora(peft_model) -> nn.Module:
    """W + ΔW into every adapted parameter, wrappers removed: the plain model (the object `add_lora` wrapped)."""
    return peft_model.merge_and_unload()

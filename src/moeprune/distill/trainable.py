"""What a distillation trains, and the values it leaves for the plan.

    select_trainables(model, adapter, train)   freeze every parameter, then unfreeze
        routers   the router parameters of every MoE layer (`adapter.router_tensors` that are parameters: weight,
                  bias, block-level expert biases; buffers such as e_score_correction_bias stay as they are)
        experts   every parameter of the routed experts module (gate/up/down and their biases, any layout)
    (`lora`: the adapters `lora.py` adds are trainable by construction.)
    trained_values(model, adapter, train)      the plan's tensors: expert views by canonical role (gate/up [I, H],
                                               down [H, I], biases) for every routed expert — all roles after
                                               `experts`, gate/up/down after `lora` — and the trained router
                                               tensors by their `router_tensors` name
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter

LORA_ROLES = ("gate", "up", "down")  # LoRA adapts the weights, never the biases


def router_parameters(model: nn.Module, adapter: MoEAdapter) -> dict[int, dict[str, nn.Parameter]]:
    """MoE layer -> router tensor name -> its parameter (router tensors that are buffers are left out)."""
    out: dict[int, dict[str, nn.Parameter]] = {}
    for layer in adapter.moe_layers():
        block = adapter.block(model, layer)
        for name in adapter.router_tensors(block):
            path, _, attr = name.rpartition(".")
            owner = block.get_submodule(path) if path else block
            p = owner._parameters.get(attr)
            if p is not None:
                out.setdefault(layer, {})[name] = p
    return out


def expert_parameters(model: nn.Module, adapter: MoEAdapter) -> list[nn.Parameter]:
    return [p for layer in adapter.moe_layers() for p in adapter.experts(adapter.block(model, layer)).parameters()]


def select_trainables(model: nn.Module, adapter: MoEAdapter, train: Iterable[str]) -> list[nn.Parameter]:
    """Freeze `model`, unfreeze the routers and/or routed experts named in `train`; the unfrozen parameters."""
    train = set(train)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen: list[nn.Parameter] = []
    if "routers" in train:
        chosen += [p for names in router_parameters(model, adapter).values() for p in names.values()]
        if not chosen:
            raise MoePruneError(f"{adapter.model_type}: its routers hold no parameters to train; drop routers from "
                                "train.")
    if "experts" in train:
        chosen += expert_parameters(model, adapter)
    for p in chosen:
        p.requires_grad_(True)
    return chosen


@torch.no_grad()
def trained_values(model: nn.Module, adapter: MoEAdapter, train: Iterable[str]
                   ) -> tuple[dict[int, dict[int, dict[str, torch.Tensor]]], dict[int, dict[str, torch.Tensor]]]:
    """(experts: layer -> expert -> role -> tensor, router: layer -> name -> tensor) of what `train` changed."""
    train = set(train)
    roles = None if "experts" in train else (LORA_ROLES if "lora" in train else ())
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    router: dict[int, dict[str, torch.Tensor]] = {}
    trained = router_parameters(model, adapter) if "routers" in train else {}
    for layer in adapter.moe_layers():
        block = adapter.block(model, layer)
        if roles != ():
            experts[layer] = {i: {r: v.detach().clone() for r, v in adapter.expert_views(block, i).items()
                                  if roles is None or r in roles} for i in range(adapter.num_experts)}
        if layer in trained:
            router[layer] = {n: t.detach().clone() for n, t in adapter.router_tensors(block).items()
                             if n in trained[layer]}
    return experts, router

"""Which weight matrices a scheme quantizes, and where they live in memory.

    routed experts   every MoE layer's experts, roles gate / up [I, H] and down [H, I] (`adapter.expert_views`)
    shared_experts   the Linear projections (gate/up/down, w1/w2/w3) of the block's shared experts
    attention        every other Linear of a decoder layer outside its MLP block (q/k/v/o, MLA's a/b projections)
Routers, shared-expert gates, embeddings, norms and the LM head are never quantized.

A target's key names it in plans: "layer.{ℓ}.expert.{i}.{role}" or "layer.{ℓ}.module.{path under the decoder layer}".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeprune.models.base import MoEAdapter
from moeprune.models.layouts import MLP_NAMES

EXPERT_ROLES = ("gate", "up", "down")
PROJ_NAMES = tuple(n for names in MLP_NAMES.values() for n in names)


@dataclass(frozen=True)
class Target:
    layer: int
    part: str  # routed_experts | shared_experts | attention
    name: str  # the role for routed experts, the module path under the decoder layer otherwise
    expert: int | None = None

    @property
    def key(self) -> str:
        if self.expert is not None:
            return f"layer.{self.layer}.expert.{self.expert}.{self.name}"
        return f"layer.{self.layer}.module.{self.name}"

    @classmethod
    def from_key(cls, key: str, part: str) -> Target:
        parts = key.split(".")
        if parts[2] == "expert":
            return cls(int(parts[1]), part, parts[4], int(parts[3]))
        return cls(int(parts[1]), part, ".".join(parts[3:]))


def find_targets(model: nn.Module, adapter: MoEAdapter, parts: tuple[str, ...], layers: list[int] | None = None
                 ) -> list[Target]:
    """Every matrix `parts` quantize, layer by layer (the model may be on meta: only module structure is read)."""
    out: list[Target] = []
    moe = set(adapter.moe_layers())
    decoder = adapter.decoder_layers(model)
    for layer in layers if layers is not None else range(len(decoder)):
        if layer in moe:
            present = adapter.expert_views(adapter.block(model, layer), 0)  # up-only experts have no gate
            roles = [role for role in EXPERT_ROLES if role in present]
            for j in range(adapter.num_experts):
                out += [Target(layer, "routed_experts", role, j) for role in roles]
            if "shared_experts" in parts:
                block = adapter.block(model, layer)
                for shared_name in adapter.shared_names:
                    shared = getattr(block, shared_name, None)
                    if shared is None:
                        continue
                    for name, mod in shared.named_modules():
                        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in PROJ_NAMES:
                            out.append(Target(layer, "shared_experts", f"{adapter.block_name}.{shared_name}.{name}"))
        if "attention" in parts:
            for name, mod in decoder[layer].named_modules():
                if isinstance(mod, nn.Linear) and not name.startswith(adapter.block_name + "."):
                    out.append(Target(layer, "attention", name))
    return out


def weight_of(model: nn.Module, adapter: MoEAdapter, t: Target) -> torch.Tensor:
    """The target's weight [out, in] as a view that writes through to the model."""
    if t.expert is not None:
        return adapter.expert_views(adapter.block(model, t.layer), t.expert)[t.name]
    return adapter.decoder_layers(model)[t.layer].get_submodule(t.name).weight

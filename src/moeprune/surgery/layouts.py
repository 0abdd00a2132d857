"""In-memory expert containers, as a registry of layouts.

- ``fused``: transformers-5 experts modules holding 3-D parameters with experts on dim 0
  (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]; gpt-oss: `gate_up_proj` [E, H, 2I] interleaved,
  `down_proj` [E, I, H] and biases [E, ·]).
- ``modulelist``: an `nn.ModuleList` of E MLP modules (remote-code and older models).

Each layout can count experts, list one expert's tensors, keep a subset of experts (renumbered in the given
order) and expose the weights by role in one canonical orientation:
gate, up: [E, I, H];  down: [E, H, I];  gate_bias, up_bias: [E, I];  down_bias: [E, H].
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.registry import Registry


class FusedLayout:
    name = "fused"

    @staticmethod
    def matches(experts: nn.Module) -> bool:
        return not isinstance(experts, nn.ModuleList) and any(
            p.dim() >= 2 for p in experts.parameters(recurse=False)
        )

    @staticmethod
    def num_experts(experts: nn.Module) -> int:
        sizes = {p.shape[0] for p in experts.parameters(recurse=False)}
        if len(sizes) != 1:
            raise MoePruneError(f"{type(experts).__name__} has parameters with different leading sizes {sizes}")
        return sizes.pop()

    @staticmethod
    def expert_tensors(experts: nn.Module, j: int) -> list[torch.Tensor]:
        return [p[j] for _, p in sorted(experts.named_parameters(recurse=False))]

    @staticmethod
    def keep(experts: nn.Module, kept: torch.Tensor) -> nn.Module:
        for name, p in list(experts.named_parameters(recurse=False)):
            sliced = p.data.index_select(0, kept.to(p.device)).contiguous()  # [E', ...]
            setattr(experts, name, nn.Parameter(sliced, requires_grad=p.requires_grad))
        return experts

    @staticmethod
    def roles(experts: nn.Module, style: str) -> dict[str, torch.Tensor]:
        gu, down = experts.gate_up_proj, experts.down_proj
        out: dict[str, torch.Tensor] = {}
        if style == "concat":  # gate_up [E, 2I, H], down [E, H, I]
            inter = gu.shape[1] // 2
            out["gate"], out["up"], out["down"] = gu[:, :inter], gu[:, inter:], down
            bias = getattr(experts, "gate_up_proj_bias", None)
            if bias is not None:
                out["gate_bias"], out["up_bias"] = bias[:, :inter], bias[:, inter:]
        elif style == "interleaved_t":  # gate_up [E, H, 2I] (gate even, up odd), down [E, I, H]
            out["gate"], out["up"] = gu[..., ::2].transpose(1, 2), gu[..., 1::2].transpose(1, 2)  # [E, I, H]
            out["down"] = down.transpose(1, 2)  # [E, H, I]
            bias = getattr(experts, "gate_up_proj_bias", None)
            if bias is not None:
                out["gate_bias"], out["up_bias"] = bias[:, ::2], bias[:, 1::2]  # [E, I]
        else:
            raise ValueError(f"unknown fused style {style!r}")
        down_bias = getattr(experts, "down_proj_bias", None)
        if down_bias is not None:
            out["down_bias"] = down_bias  # [E, H]
        return out


_MLP_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


class ModuleListLayout:
    name = "modulelist"

    @staticmethod
    def matches(experts: nn.Module) -> bool:
        return isinstance(experts, nn.ModuleList)

    @staticmethod
    def num_experts(experts: nn.Module) -> int:
        return len(experts)

    @staticmethod
    def expert_tensors(experts: nn.Module, j: int) -> list[torch.Tensor]:
        return [p for _, p in sorted(experts[j].named_parameters())]

    @staticmethod
    def keep(experts: nn.Module, kept: torch.Tensor) -> nn.Module:
        return nn.ModuleList([experts[int(j)] for j in kept])

    @staticmethod
    def roles(experts: nn.Module, style: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for role, names in _MLP_NAMES.items():
            name = next((n for n in names if hasattr(experts[0], n)), None)
            if name is None:
                raise MoePruneError(f"expert MLP {type(experts[0]).__name__} has none of {names}")
            out[role] = torch.stack([getattr(e, name).weight for e in experts])  # [E, out, in]
            if getattr(getattr(experts[0], name), "bias", None) is not None:
                out[f"{role}_bias"] = torch.stack([getattr(e, name).bias for e in experts])
        return out


LAYOUTS: Registry[type] = Registry("experts layout")
LAYOUTS.register("modulelist", ModuleListLayout)
LAYOUTS.register("fused", FusedLayout)


def layout_of(experts: nn.Module):
    """The layout class describing this experts container."""
    for _, layout in LAYOUTS.items():
        if layout.matches(experts):
            return layout
    raise MoePruneError(
        f"experts container {type(experts).__name__} is neither a ModuleList of MLPs nor fused 3-D tensors; "
        "add a layout in src/moeprune/surgery/layouts.py."
    )

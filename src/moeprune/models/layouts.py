"""In-memory expert containers, as a registry of layouts (part of the data model: statistics, criteria,
selection and surgery all read experts through it).

- ``fused``: transformers-5 experts modules holding 3-D parameters with experts on dim 0
  (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]; gpt-oss: `gate_up_proj` [E, H, 2I] interleaved,
  `down_proj` [E, I, H] and biases [E, ·]).
- ``modulelist``: an `nn.ModuleList` of E MLP modules (remote-code and older models).
- ``flat``: 2-D tensors [E·I, H] with each expert's I rows contiguous (DBRX `experts.mlp.w1/v1/w2`), E from the
  container's count attribute; canonical roles are views of [E, I, H] blocks.

Each layout can count experts, list one expert's tensors, keep a subset of experts (renumbered in the given
order) and expose the weights by role in one canonical orientation:
gate, up: [E, I, H];  down: [E, H, I];  gate_bias, up_bias: [E, I];  down_bias: [E, H].

`experts_shape` reads (E, I) of a container from its tensors; `MLP_NAMES` / `mlp_name` name the projections of
one ModuleList expert; `FUSED_PARAMS` are the fused parameters neuron surgery knows; `WIDTH_ATTRS` are the integer
module attributes that store the expert width.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.models.fused_styles import style_of, take_per_expert
from moeprune.models.scratch import keep_rows
from moeprune.registry import Registry


def fused_rows(experts: nn.Module) -> tuple[int, int] | None:
    """(E, router rows) of fused experts: E = the leading size shared by every 3-D parameter, or `down_proj`'s
    when the input projection has more rows (rows E.. are weightless extra router classes, unused; LongCat-Flash
    gate_up_proj [E + Z, 2I, H], down_proj [E, H, I]); None when not readable."""
    sizes = {p.shape[0] for p in experts.parameters(recurse=False) if p.dim() >= 2}
    if len(sizes) == 1:
        E = sizes.pop()
        return E, E
    down = getattr(experts, "down_proj", None)
    if isinstance(down, torch.Tensor) and len(sizes) == 2 and down.shape[0] == min(sizes):
        return int(down.shape[0]), int(max(sizes))
    return None



class FusedLayout:
    name = "fused"

    @staticmethod
    def matches(experts: nn.Module) -> bool:
        return not isinstance(experts, nn.ModuleList) and any(
            p.dim() >= 2 for p in experts.parameters(recurse=False)
        )

    @staticmethod
    def num_experts(experts: nn.Module) -> int:
        """E: the leading size of every parameter, or of down_proj when the input projection also holds unused
        rows for weightless extra router classes (`fused_rows`: LongCat-Flash gate_up [E + Z, ...])."""
        rows = fused_rows(experts)
        if rows is None:
            sizes = {p.shape[0] for p in experts.parameters(recurse=False)}
            raise MoePruneError(f"{type(experts).__name__} has parameters with different leading sizes {sizes}")
        return rows[0]

    @staticmethod
    def expert_tensors(experts: nn.Module, j: int) -> list[torch.Tensor]:
        return [p[j] for _, p in sorted(experts.named_parameters(recurse=False))]

    @staticmethod
    def keep(experts: nn.Module, kept: torch.Tensor) -> nn.Module:
        """Rows `kept` of every parameter; a parameter with E + Z rows (extra router classes) keeps its last Z
        rows after them."""
        E = FusedLayout.num_experts(experts)
        for name, p in list(experts.named_parameters(recurse=False)):
            extra = torch.arange(E, p.shape[0], dtype=kept.dtype)  # [Z] (empty for E rows)
            sliced = keep_rows(p.data, torch.cat([kept, extra]))  # [K (+ Z), ...]; in place on a scratch buffer
            setattr(experts, name, nn.Parameter(sliced, requires_grad=p.requires_grad))
        return experts

    @staticmethod
    def roles(experts: nn.Module, style: str) -> dict[str, torch.Tensor]:
        """Canonical views of the E experts (rows of extra router classes left out)."""
        E = FusedLayout.num_experts(experts)
        return {k: v[:E] for k, v in style_of(experts, style).roles(experts).items()}

    @staticmethod
    def take_neurons(experts: nn.Module, style: str, idx: torch.Tensor) -> None:
        style_of(experts, style).take_neurons(experts, idx)


MLP_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
# integer module attributes that store the expert width and must follow surgery
WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "ffn_dim", "moe_intermediate_size",
               "ffn_hidden_size")


def mlp_name(expert: nn.Module, role: str) -> str:
    """The attribute of one ModuleList expert MLP that holds `role` ("gate", "up" or "down")."""
    name = next((n for n in MLP_NAMES[role] if hasattr(expert, n)), None)
    if name is None:
        raise MoePruneError(f"expert MLP {type(expert).__name__} has none of {MLP_NAMES[role]}")
    return name


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
        for role, names in MLP_NAMES.items():
            name = next((n for n in names if hasattr(experts[0], n)), None)
            if name is None:
                raise MoePruneError(f"expert MLP {type(experts[0]).__name__} has none of {names}")
            out[role] = torch.stack([getattr(e, name).weight for e in experts])  # [E, out, in]
            if getattr(getattr(experts[0], name), "bias", None) is not None:
                out[f"{role}_bias"] = torch.stack([getattr(e, name).bias for e in experts])
        return out


class FlatLayout:
    """Experts flattened into 2-D tensors [E·I, H] held by the container or one child (DBRX `experts.mlp`):
    `w1` gate, `v1` up, `w2` down, expert j's neurons on rows j·I..(j+1)·I of each. The experts compute
    h = act(x·w1_jᵀ) · (x·v1_jᵀ), y = h·w2_j: the down weight is stored per expert as [I, H], the transpose of
    the canonical [H, I]. E is the container's count attribute (the tensors alone cannot tell E from I)."""

    name = "flat"
    ROLES = {"gate": "w1", "up": "v1", "down": "w2"}  # role -> parameter, each [E·I, H]
    TRANSPOSED = frozenset({"down"})  # roles stored per expert as [I, H] (canonical down is [H, I])
    COUNT_ATTRS = ("num_experts", "moe_num_experts")

    @staticmethod
    def holder(experts: nn.Module) -> nn.Module | None:
        """The module holding the flat tensors: the container itself or one of its children."""
        names = set(FlatLayout.ROLES.values())
        for m in (experts, *experts.children()):
            params = dict(m.named_parameters(recurse=False))
            if names <= set(params) and all(params[n].dim() == 2 for n in names):
                return m
        return None

    @staticmethod
    def matches(experts: nn.Module) -> bool:
        return (not isinstance(experts, nn.ModuleList) and FlatLayout.holder(experts) is not None
                and FlatLayout._count(experts) is not None)

    @staticmethod
    def _count(experts: nn.Module) -> int | None:
        holder = FlatLayout.holder(experts)
        for m in (experts, holder):
            for a in FlatLayout.COUNT_ATTRS:
                if isinstance(getattr(m, a, None), int):
                    return getattr(m, a)
        return None

    @staticmethod
    def num_experts(experts: nn.Module) -> int:
        E = FlatLayout._count(experts)
        rows = FlatLayout.holder(experts).w1.shape[0]
        if not E or rows % E:
            raise MoePruneError(f"{type(experts).__name__}: {rows} flat rows are not {E} experts of equal width.")
        return E

    @staticmethod
    def width(experts: nn.Module) -> int:
        return FlatLayout.holder(experts).w1.shape[0] // FlatLayout.num_experts(experts)

    @staticmethod
    def blocks(experts: nn.Module) -> dict[str, torch.Tensor]:
        """parameter name -> view [E, I, H] of its stored [E·I, H] tensor."""
        holder, E = FlatLayout.holder(experts), FlatLayout.num_experts(experts)
        return {n: getattr(holder, n).view(E, -1, getattr(holder, n).shape[1]) for n in FlatLayout.ROLES.values()}

    @staticmethod
    def act_fn(experts: nn.Module):
        holder = FlatLayout.holder(experts)
        return next(getattr(m, a) for m in (holder, experts) for a in ("activation_fn", "act_fn") if hasattr(m, a))

    @staticmethod
    def expert_tensors(experts: nn.Module, j: int) -> list[torch.Tensor]:
        return [t[j] for _, t in sorted(FlatLayout.blocks(experts).items())]

    @staticmethod
    def _replace(experts: nn.Module, name: str, blocks: torch.Tensor) -> None:
        """Store [E', I', H] blocks as parameter `name` [E'·I', H]."""
        holder = FlatLayout.holder(experts)
        old = getattr(holder, name)
        setattr(holder, name, nn.Parameter(blocks.reshape(-1, blocks.shape[-1]).contiguous(),
                                           requires_grad=old.requires_grad))

    @staticmethod
    def keep(experts: nn.Module, kept: torch.Tensor) -> nn.Module:
        for name, t in FlatLayout.blocks(experts).items():
            FlatLayout._replace(experts, name, keep_rows(t.data, kept))  # [K, I, H]
        return experts

    @staticmethod
    def roles(experts: nn.Module, style: str = "") -> dict[str, torch.Tensor]:
        blocks = FlatLayout.blocks(experts)
        return {role: blocks[n].transpose(1, 2) if role in FlatLayout.TRANSPOSED else blocks[n]  # [E, I, H] / [E, H, I]
                for role, n in FlatLayout.ROLES.items()}

    @staticmethod
    def take_neurons(experts: nn.Module, style: str, idx: torch.Tensor) -> None:
        """Keep neurons idx [E, I'] (per expert, in that order): rows of every [E, I, H] block."""
        for name, t in FlatLayout.blocks(experts).items():
            FlatLayout._replace(experts, name, take_per_expert(t.data, 1, idx))  # [E, I', H]


LAYOUTS: Registry[type] = Registry("experts layout")
LAYOUTS.register("modulelist", ModuleListLayout)
LAYOUTS.register("fused", FusedLayout)
LAYOUTS.register("flat", FlatLayout)


def layout_of(experts: nn.Module):
    """The layout class describing this experts container."""
    for _, layout in LAYOUTS.items():
        if layout.matches(experts):
            return layout
    raise MoePruneError(
        f"experts container {type(experts).__name__} is neither a ModuleList of MLPs nor fused 3-D tensors; "
        "add a layout in src/moeprune/models/layouts.py."
    )


def experts_shape(adapter, experts: nn.Module) -> tuple[int, int]:
    """(E, I) of one experts container, read from its tensors; refuses layouts neuron surgery does not know.

    `adapter` is the family's `MoEAdapter` (only its `fused_style` is read)."""
    if layout_of(experts) is ModuleListLayout:
        widths = {getattr(e, mlp_name(e, "gate")).weight.shape[0] for e in experts}
        if len(widths) != 1:
            raise MoePruneError(f"the experts of this layer already have different widths {sorted(widths)}.")
        return len(experts), widths.pop()
    if layout_of(experts) is FlatLayout:
        return FlatLayout.num_experts(experts), FlatLayout.width(experts)
    style = style_of(experts, adapter.fused_style)
    names = {n for n, _ in experts.named_parameters(recurse=False)}
    known = {style.in_name, style.in_bias_name, "down_proj", "down_proj_bias"}
    if not {style.in_name, "down_proj"} <= names or names - known:
        raise MoePruneError(f"fused experts {type(experts).__name__} hold {sorted(names)}; neuron surgery knows "
                            f"{sorted(known)} for style {style.name!r}.")
    gates = 2 if style.gated else 1
    stored = getattr(experts, style.in_name)
    E, inter = FusedLayout.num_experts(experts), style.width(experts)
    if stored.shape[2 if style.transposed else 1] != gates * inter:
        raise MoePruneError(f"{type(experts).__name__}: {style.in_name} {tuple(stored.shape)} and down_proj "
                            f"{tuple(experts.down_proj.shape)} do not agree on one width for style {style.name!r}.")
    return E, inter

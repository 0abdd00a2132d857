"""`MoEAdapter`: one architecture family's MoE block described as data.

An adapter answers, from the *config alone* (so it works on checkpoints that are never instantiated):
which decoder layers are MoE, how many routed experts (E) and top-k they have, how they route, which config
keys hold the counts, and how their tensors are named on disk. Given an in-memory model it also finds the
router, the experts container and the shared experts of each MoE layer.

Subclasses normally set class attributes only; `moe_layers` and `routing` are the usual overrides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.io.quant_config import NESTED
from moeprune.models.keys import COUNT_KEYS, get_key, set_key
from moeprune.models.layouts import layout_of
from moeprune.models.routing import RoutingSpec


@dataclass(frozen=True)
class KeyRole:
    """What one on-disk tensor is, for surgery and accounting.

    kind: "expert" (one expert's tensor, `expert` set), "fused" (all experts stacked on dim 0),
          "router" (dim 0 indexes experts: router weight/bias, correction bias), "shared" (shared experts and
          their gate), "other" (attention, norms, dense MLPs, embeddings).
    """

    kind: str
    layer: int | None = None
    expert: int | None = None
    prefix: str = ""  # for "expert": the key up to and including "experts."
    suffix: str = ""  # for "expert": the key after the expert index, starting with "."

    def renamed(self, new_index: int) -> str:
        assert self.kind == "expert"
        return f"{self.prefix}{new_index}{self.suffix}"


def expert_axis(t: torch.Tensor | None, num_experts: int) -> int | None:
    """The axis of `t` that indexes experts: 0 when dim 0 has E entries, the last one for [1, ..., 1, E]
    (ERNIE's [1, E] correction bias), else None."""
    return None if t is None else shape_expert_axis(tuple(t.shape), num_experts)


def shape_expert_axis(shape: tuple[int, ...], num_experts: int) -> int | None:
    """`expert_axis` of a tensor of this shape (for on-disk tensors, which have a shape and no data)."""
    if not shape:
        return None
    if shape[0] == num_experts:
        return 0
    if len(shape) >= 2 and shape[-1] == num_experts and all(s == 1 for s in shape[:-1]):
        return len(shape) - 1
    return None


def expert_indexed(module: nn.Module, num_experts: int, prefix: str = "", recurse: bool = True
                   ) -> dict[str, torch.Tensor]:
    """Parameters and buffers under `module` that index experts, as views with experts on dim 0 ([E, ...]),
    keyed by name (prefixed with `prefix.`)."""
    dot = prefix + "." if prefix else ""
    named = list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))
    out = {}
    for n, t in named:
        axis = expert_axis(t, num_experts)
        if axis is not None:
            out[dot + n] = t if axis == 0 else t.movedim(axis, 0)
    return out


class MoEAdapter:
    """Base adapter. Class attributes describe the family; see `models/qwen3_moe.py` for the smallest example."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    count_key: ClassVar[str] = "num_experts"  # config key holding E
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    intermediate_key: ClassVar[str] = "moe_intermediate_size"  # config key of the routed expert width
    block_name: ClassVar[str] = "mlp"  # attribute of the decoder layer holding the MoE block (in memory)
    disk_block_names: ClassVar[tuple[str, ...]] = ("mlp",)  # its name(s) in checkpoint keys
    router_name: ClassVar[str] = "gate"
    experts_name: ClassVar[str] = "experts"
    shared_names: ClassVar[tuple[str, ...]] = ()  # shared experts and their gates, never pruned
    # module attributes that hold E (or E + Z, see `extra_classes`) and must follow surgery
    count_attrs: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                                              "num_routed_experts", "total_experts")
    # how the fused gate/up tensor is laid out (see models/layouts.py): "concat" [E, 2I, H] or
    # "interleaved_t" [E, H, 2I] with gate at even and up at odd columns (gpt-oss)
    fused_style: ClassVar[str] = "concat"
    router_logits_at: ClassVar[int] = 0  # the element of the router's output tuple that holds the logits [T, E]
    gated_experts: ClassVar[bool] = True  # False: up-only experts y = down·act(up·x) (nemotron_h)

    def __init__(self, config: Any):
        self.root_config = config
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._check_config()

    # ---------------------------------------------------------------- config-level facts
    def _check_config(self) -> None:
        for key in (self.count_key, self.top_k_key, "num_hidden_layers"):
            if get_key(self.config, key) is None:
                raise MoePruneError(
                    f"config of model_type {self.model_type!r} has no {key!r}: it does not look like a "
                    f"{self.family} MoE config. Check the checkpoint's config.json."
                )
        if self.num_experts < 1:
            raise MoePruneError(f"{self.count_key}={self.num_experts}: this model has no routed experts.")

    @property
    def model_type(self) -> str:
        return getattr(self.config, "model_type", "") or getattr(self.root_config, "model_type", "")

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_experts(self) -> int:
        return int(get_key(self.config, self.count_key))

    @property
    def extra_classes(self) -> int:
        """Z: router classes after the E experts that have no expert weights (LongCat-Flash's identity "zero
        experts", selected like experts, output = gate weight × input). They are not experts: never scored nor
        removed, always kept as the last Z router classes (`keep_rows`)."""
        return 0

    @property
    def router_classes(self) -> int:
        """E + Z: the width of the router's scores."""
        return self.num_experts + self.extra_classes

    def keep_rows(self, kept: torch.Tensor, rows: int, num_experts: int | None = None) -> torch.Tensor:
        """The rows to keep of a tensor with `rows` rows indexed by router class when experts `kept` [K] stay:
        `kept` for E rows, `kept` then the Z extra classes [E, E + Z) for E + Z rows (so a stock model built
        with K experts routes classes K.. to them). `num_experts`: the E the tensor holds now (default: config)."""
        E = self.num_experts if num_experts is None else num_experts
        if rows == E:
            return kept
        if rows == E + self.extra_classes:
            return torch.cat([kept, torch.arange(E, rows, dtype=kept.dtype, device=kept.device)])  # [K + Z]
        raise MoePruneError(f"a tensor with {rows} rows indexes neither the {E} experts nor the {E} + "
                            f"{self.extra_classes} router classes.")

    @property
    def top_k(self) -> int:
        return int(get_key(self.config, self.top_k_key))

    @property
    def expert_width(self) -> int | None:
        value = get_key(self.config, self.intermediate_key)
        return int(value) if value is not None else None

    def moe_layers(self) -> list[int]:
        """Decoder-layer indices that hold a routed MoE block (all layers unless overridden)."""
        return list(range(self.num_layers))

    def routing(self) -> RoutingSpec:
        return RoutingSpec(
            kind="softmax_topk",
            top_k=self.top_k,
            norm_topk_prob=bool(getattr(self.config, "norm_topk_prob", False)),
        )

    # ---------------------------------------------------------------- on-disk layout
    def _key_regex(self) -> re.Pattern[str]:
        blocks = "|".join(re.escape(b) for b in self.disk_block_names)
        return re.compile(rf"^(?P<head>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:{blocks})\.)(?P<rest>.+)$")

    def classify_key(self, key: str) -> KeyRole:
        """Classify one checkpoint tensor name (see `KeyRole`)."""
        m = self._key_regex().match(key)
        if m is None:
            return KeyRole("other")
        layer = int(m.group("layer"))
        if layer not in self._moe_layer_set():
            return KeyRole("other", layer)
        rest = m.group("rest")
        exp = re.match(rf"^{re.escape(self.experts_name)}\.(\d+)(\..+)$", rest)
        if exp:
            return KeyRole(
                "expert", layer, int(exp.group(1)), m.group("head") + self.experts_name + ".", exp.group(2)
            )
        if rest.startswith(self.experts_name + "."):
            return KeyRole("fused", layer)
        if rest.startswith(self.router_name + "."):
            return KeyRole("router", layer)
        if any(rest.startswith(s + ".") for s in self.shared_names):
            return KeyRole("shared", layer)
        return KeyRole("other", layer)

    def _moe_layer_set(self) -> frozenset[int]:
        cached = getattr(self, "_moe_set", None)
        if cached is None:
            cached = self._moe_set = frozenset(self.moe_layers())
        return cached

    # ---------------------------------------------------------------- in-memory model
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of decoder layers (searched, so multimodal nestings work too)."""
        for name, module in model.named_modules():
            if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                return module
        raise MoePruneError(
            f"could not find the {self.num_layers} decoder layers in {type(model).__name__}; "
            "the adapter's decoder_layers() needs overriding for this model."
        )

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        block = getattr(self.decoder_layers(model)[layer], self.block_name, None)
        if block is None or not hasattr(block, self.experts_name):
            raise MoePruneError(
                f"decoder layer {layer} of {type(model).__name__} has no MoE block at "
                f"'.{self.block_name}.{self.experts_name}' although the config says it is a MoE layer."
            )
        return block

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_name)

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_name)

    def router_tensors(self, block: nn.Module, num_experts: int | None = None) -> dict[str, torch.Tensor]:
        """Every tensor that routes by expert, as a view [E (+ Z), ...] keyed by its name under the block: the router's
        (recursively: weight [E, H], bias / e_score_correction_bias [E], [1, E] biases of a sub-module) and
        selection biases kept on the block itself (afmoe, lfm2_moe `expert_bias`). Experts and shared experts
        are not included. `num_experts`: the count the block holds now (default: the config's E)."""
        E = (self.num_experts if num_experts is None else num_experts) + self.extra_classes  # router classes
        out = expert_indexed(self.router(block), E, self.router_name)
        out.update(expert_indexed(block, E, recurse=False))
        return out

    def set_router_tensor(self, block: nn.Module, name: str, rows: torch.Tensor) -> None:
        """Replace router tensor `name` (as `router_tensors` names it) by `rows` [K, ...] (experts on dim 0),
        stored on the original axis; an nn.Linear owner gets out_features = K."""
        path, _, attr = name.rpartition(".")
        owner = block.get_submodule(path) if path else block
        old = getattr(owner, attr)
        axis = expert_axis(old, self.router_classes)
        value = (rows if axis == 0 else rows.movedim(0, axis)).contiguous()
        if attr in owner._parameters:
            setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            owner._buffers[attr] = value
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features = rows.shape[0]

    def expert_roles(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """Expert weights by role in canonical orientation (gate/up [E, I, H], down [E, H, I], biases)."""
        experts = self.experts(block)
        return layout_of(experts).roles(experts, self.fused_style)

    def expert_views(self, block: nn.Module, j: int) -> dict[str, torch.Tensor]:
        """Expert j's tensors by canonical role as views that write through to the model (gate/up [I, H], down
        [H, I], biases): module-list experts give their Linear weights, fused/flat layouts slices of `expert_roles`."""
        from moeprune.models.layouts import MLP_NAMES, ModuleListLayout

        experts = self.experts(block)
        if layout_of(experts) is not ModuleListLayout:
            return {role: t[j] for role, t in self.expert_roles(block).items()}
        mlp, views = experts[j], {}
        for role, names in MLP_NAMES.items():
            lin = getattr(mlp, next(n for n in names if hasattr(mlp, n)))
            views[role] = lin.weight
            if lin.bias is not None:
                views[f"{role}_bias"] = lin.bias
        return views

    def expert_glu(self, experts: nn.Module):
        """(gate_out [n, I] or None, up_out [n, I]) -> the activation h [n, I] that enters the down projection, as
        the experts module itself computes it:

        - up-only experts (fused style with gated=False, e.g. nemotron_h): h = act_fn(up);
        - a module with `_apply_gate` (transformers' `use_experts_implementation`, gpt-oss, MiniMax-M3 clamped
          SwiGLU, ...): h = _apply_gate(gate_up) on the [n, 2I] activations re-joined in the module's own order
          (concatenated [gate | up] or interleaved [g0 u0 g1 u1 ..], from its fused style);
        - else SwiGLU-style h = act_fn(gate) * up.
        """
        from moeprune.models.fused_styles import style_of

        layout = layout_of(experts)
        if hasattr(layout, "act_fn"):  # flat experts: the activation sits next to the flat tensors
            act = layout.act_fn(experts)
            return lambda g, u: act(g) * u
        fused = layout.name == "fused"
        style = style_of(experts, self.fused_style) if fused else None
        if style is not None and not style.gated:
            act = experts.act_fn
            return lambda g, u: act(u)
        apply_gate = getattr(experts, "_apply_gate", None) if fused else None
        if apply_gate is not None:
            if style.interleaved:
                return lambda g, u: apply_gate(torch.stack([g, u], dim=-1).flatten(-2))  # [n, 2I]: g0 u0 g1 u1 ..
            return lambda g, u: apply_gate(torch.cat([g, u], dim=-1))  # [n, 2I]: gate | up
        act = experts.act_fn
        return lambda g, u: act(g) * u

    def shared_experts(self, block: nn.Module) -> list[nn.Module]:
        return [getattr(block, n) for n in self.shared_names if getattr(block, n, None) is not None]

    def set_config_experts(self, config: Any, num_experts: int) -> None:
        """Write the new routed-expert count into a config object (text sub-config when nested)."""
        target = config.get_text_config() if hasattr(config, "get_text_config") else config
        set_key(target, self.count_key, num_experts)  # Z extra router classes: their own key, unchanged

    def set_config_width(self, config: Any, width: int) -> None:
        """Write the new routed-expert width I' into a config object (text sub-config when nested)."""
        target = config.get_text_config() if hasattr(config, "get_text_config") else config
        set_key(target, self.intermediate_key, width)

    def set_config_dict_experts(self, config: dict, num_experts: int) -> None:
        """Same on a raw config.json dict (streaming apply never builds a config object).

        The count may be saved under the family's key or an alias (transformers' attribute_map, e.g. Qwen3-MoE
        writes `num_local_experts` while Hub checkpoints say `num_experts`): every alias holding E is updated.
        """
        target = config
        for nest in ("thinker_config", *NESTED):  # an omni model's text config: thinker_config.text_config
            held = any(get_key(target, k) is not None for k in (self.count_key, *COUNT_KEYS))
            if not held and isinstance(target.get(nest), dict):
                target = target[nest]
        keys = [k for k in dict.fromkeys((self.count_key, *COUNT_KEYS)) if get_key(target, k) == self.num_experts]
        if not keys:
            raise MoePruneError(
                f"config.json holds no expert count equal to {self.num_experts} under {self.count_key!r} or its "
                "aliases (looked in nested text configs too); cannot update it."
            )
        for k in keys:
            set_key(target, k, num_experts)

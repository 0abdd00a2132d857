"""`StructuralAdapter`: a family described by what `models/structure.py` finds on its meta model, plus a few
facts as data (`FamilySpec` in `models/families.py`).

Everything an adapter answers is taken from the stock model's structure:
- MoE layers, block / router / experts / shared-expert names: `discover(config)`;
- the config keys holding E, k and the expert width I: the first alias (`models/keys.py`, then the family's own
  keys) whose value equals what the tensors say (E from the experts, I from their width);
- how a checkpoint key is used: `target_of` (transformers' conversion mapping), then its place in the structure;
- the routing kind: the family's `FamilySpec` when it gives one (fixed, or picked by a config value), else read off
  the router's and the block's source code (comments and docstrings removed):

    selection bias ([E] or [1, E], named *correction* or *expert_bias*, in the block) + sigmoid -> sigmoid_grouped
    correction bias + softmax -> softmax_bias
    correction bias + sigmoid / softmax applied only after the top-k (the bias is added to the logits, Kolibri-1)
        -> sigmoid_topk / topk_softmax
    n_group + softmax -> softmax_grouped;   sigmoid without a selection bias -> sigmoid_topk;   otherwise
    softmax_topk

  Group counts, top-k renormalisation and the scaling factor come from the config (`n_group`, `topk_group`,
  `norm_topk_prob`, `routed_scaling_factor`). The reference (`masking.py`) masks inside the model's own router,
  so a wrong kind shows up as a failed `verify` (every family is checked in `tests/test_family_matrix.py`).
"""

from __future__ import annotations

import functools
import inspect
import io
import re
import textwrap
import tokenize
from typing import Any

from torch import nn

from moeprune.errors import MoePruneError
from moeprune.models.base import KeyRole, MoEAdapter, shape_expert_axis
from moeprune.models.keys import COUNT_KEYS, TOP_K_KEYS, get_key
from moeprune.models.routing import RoutingSpec
from moeprune.models.structure import PER_EXPERT, Structure, discover, target_of

WIDTH_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "moe_ffn_hidden_size", "intermediate_size",
              "ffn_hidden_size")
SELECTION_BIAS = re.compile(r"(correction|expert_bias)")


class StructuralAdapter(MoEAdapter):
    family = "structural"
    spec: Any = None  # the FamilySpec this adapter was made from (set by families.py)

    def __init__(self, config: Any):
        spec = self.spec
        self.structure: Structure = discover(config)
        s = self.structure
        self.block_name, self.router_name, self.experts_name = s.block_name, s.router_name, s.experts_name
        self.disk_block_names = (s.block_name,)
        self.shared_names = s.shared_names
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        extra = tuple(getattr(spec, "count_keys", ()) or ())
        self.count_key = _key_equal(text, (*extra, *COUNT_KEYS), s.num_experts) or ""
        self.top_k_key = next((k for k in (*tuple(getattr(spec, "top_k_keys", ()) or ()), *TOP_K_KEYS)
                               if isinstance(get_key(text, k), int)), "")
        self.fused_style = getattr(spec, "fused_style", None) or self.fused_style
        self.router_logits_at = getattr(spec, "router_logits_at", 0)
        width = _key_equal(text, (*tuple(getattr(spec, "width_keys", ()) or ()), *WIDTH_KEYS), self._width(s))
        self.gated_experts = self._gated(s)
        self.intermediate_key = width or "moe_intermediate_size"
        if not self.count_key:
            raise MoePruneError(f"{type(text).__name__} holds no expert count equal to the {s.num_experts} experts "
                                f"of {s.experts_class} under {', '.join((*extra, *COUNT_KEYS))}.")
        key = getattr(spec, "extra_classes_key", "")
        self._extra = int(getattr(text, key, None) or 0) if key else 0
        if self._extra != s.extra_classes:
            raise MoePruneError(f"{s.router_class} scores {s.router_rows} classes for {s.num_experts} experts; the "
                                f"family declares {self._extra} extra router classes "
                                f"({key or 'no extra_classes_key'} in models/families.py).")
        super().__init__(config)
        self.family = getattr(spec, "family", None) or self.model_type

    @staticmethod
    def _meta_experts(s: Structure) -> nn.Module:
        layers = s.meta.get_submodule(s.layers_path)
        return getattr(layers[s.moe_layers[0]].get_submodule(s.block_name), s.experts_name)

    def _width(self, s: Structure) -> int | None:
        """I read from the meta experts in the family's declared fused style (modules with layout flags: theirs)."""
        if getattr(self.spec, "fused_style", None) is None:
            return s.width
        from moeprune.models.fused_styles import style_of

        experts = self._meta_experts(s)
        return style_of(experts, self.fused_style).width(experts)

    def _gated(self, s: Structure) -> bool:
        """False for fused up-only experts (`has_gate=False`: a lone `up_proj`)."""
        from moeprune.models.layouts import FusedLayout, layout_of

        experts = self._meta_experts(s)
        if layout_of(experts) is not FusedLayout:
            return True
        from moeprune.models.fused_styles import style_of

        return style_of(experts, self.fused_style).gated

    def moe_layers(self) -> list[int]:
        return list(self.structure.moe_layers)

    @property
    def num_layers(self) -> int:
        return self.structure.num_layers

    @property
    def extra_classes(self) -> int:
        return self._extra

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        try:
            return model.get_submodule(self.structure.layers_path)
        except AttributeError:
            return super().decoder_layers(model)

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        try:
            block = self.decoder_layers(model)[layer].get_submodule(self.block_name)  # "" -> the layer itself
        except AttributeError:
            block = None
        if block is None or not hasattr(block, self.experts_name):
            raise MoePruneError(f"decoder layer {layer} of {type(model).__name__} has no MoE block at "
                                f"'.{self.block_name}.{self.experts_name}'.")
        return block

    def classify_key(self, key: str) -> KeyRole:
        target = target_of(self.structure, key)
        block = re.escape(self.block_name) + r"\." if self.block_name else ""
        m = re.match(rf"^{re.escape(self.structure.layers_path)}\.(\d+)\.{block}(.+)$", target)
        if m is None:
            layer = re.search(rf"^{re.escape(self.structure.layers_path)}\.(\d+)\.", target)
            return KeyRole("other", int(layer.group(1)) if layer else None)
        layer, rest = int(m.group(1)), m.group(2)
        if layer not in self._moe_layer_set():
            return KeyRole("other", layer)
        if rest.startswith(self.experts_name + "."):
            per = PER_EXPERT.match(key)
            if per:
                return KeyRole("expert", layer, int(per.group("j")), per.group("prefix"), per.group("suffix"))
            if not self._expert_indexed(target):
                return KeyRole("other", layer)  # e.g. a norm shared by every expert (muse_spark post_expert_norm)
            return KeyRole("fused", layer)
        if rest.startswith(self.router_name + "."):  # its [E]-indexed tensors; others (Gemma-4's scale [H]) stay
            return KeyRole("router" if self._expert_indexed(target, strict=True) else "other", layer)
        if any(rest.startswith(s + ".") for s in self.shared_names):
            return KeyRole("shared", layer)
        if SELECTION_BIAS.search(rest):
            return KeyRole("router", layer)  # a selection bias kept on the block (afmoe, lfm2_moe)
        return KeyRole("other", layer)

    def _expert_indexed(self, target: str, strict: bool = False) -> bool:
        """Whether the in-memory tensor `target` indexes experts (`models/base.expert_axis`: dim 0, or the last dim
        of a [1, E] tensor; E or E + Z router classes); names the meta model lacks count as expert-indexed unless
        `strict`."""
        s = self.structure
        shape = _meta_shapes(id(s.meta), s).get(target)
        if shape is None:
            return not strict
        if not strict and s.width and len(shape) == 2 and shape[0] == s.num_experts * s.width:
            return True  # flattened experts [E·I, H] (models/layouts.FlatLayout)
        return any(shape_expert_axis(shape, n) is not None for n in {s.num_experts, s.router_rows})

    def routing(self) -> RoutingSpec:
        c = self.config
        spec = self.spec
        kind = (spec.routing_kind(c) if spec is not None else None) or infer_kind(self.structure)
        n_group = int(getattr(c, "n_group", None) or 1)
        return RoutingSpec(
            kind=kind, top_k=self.top_k, norm_topk_prob=bool(getattr(c, "norm_topk_prob", False)),
            n_group=n_group if kind in ("sigmoid_grouped", "softmax_grouped") else 1,
            topk_group=int(getattr(c, "topk_group", None) or 1),
            routed_scaling_factor=float(getattr(c, "routed_scaling_factor", None) or 1.0),
            correction_bias=has_selection_bias(self.structure),
        )


@functools.lru_cache(maxsize=32)
def _meta_shapes(_: int, structure: Structure) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in structure.meta.state_dict().items()}


def _key_equal(config: Any, keys: tuple[str, ...], value: int | None) -> str | None:
    """The first key whose int value equals `value` (any int key when value is None)."""
    for k in keys:
        v = get_key(config, k)
        if isinstance(v, int) and not isinstance(v, bool) and (value is None or v == value):
            return k
    return None


def _block_tensors(structure: Structure):
    """(router, block, [(name, tensor)] of the block outside experts and shared experts) of the first MoE layer."""
    layers = structure.meta.get_submodule(structure.layers_path)
    block = layers[structure.moe_layers[0]].get_submodule(structure.block_name)
    skip = (structure.experts_name + ".", *(s + "." for s in structure.shared_names))
    tensors = [(n, t) for n, t in (*block.named_parameters(), *block.named_buffers()) if not n.startswith(skip)]
    return getattr(block, structure.router_name), block, tensors


def has_selection_bias(structure: Structure) -> bool:
    """Whether the block holds a selection bias ([E] or [1, E], named *correction* / *expert_bias*)."""
    _, _, tensors = _block_tensors(structure)
    rows = (structure.num_experts, structure.router_rows)
    return any(SELECTION_BIAS.search(n) and t.shape[-1] in rows for n, t in tensors)


def infer_kind(structure: Structure) -> str:
    """The routing kind read off the router's forward source and the block's tensors (module docstring)."""
    router, block, _ = _block_tensors(structure)
    source = _code(type(router)) + _code(type(block))
    has_bias = has_selection_bias(structure)
    softmax, sigmoid = "softmax" in source, "sigmoid" in source
    if has_bias and (softmax != sigmoid):
        act = source.index("sigmoid" if sigmoid else "softmax")
        topk = source.find("topk (")  # tokens are joined by spaces
        if 0 <= topk < act:  # the activation only sees the selected logits: the bias is added to the logits
            return "sigmoid_topk" if sigmoid else "topk_softmax"
        return "sigmoid_grouped" if sigmoid else "softmax_bias"
    if has_bias:
        which = "both softmax and sigmoid" if softmax else "neither softmax nor sigmoid"
        raise MoePruneError(f"{type(router).__name__} uses a selection bias with {which} in its code; declare the "
                            "family's routing kind in models/families.py (FamilySpec.routing or routing_key).")
    if "n_group" in source and softmax:
        return "softmax_grouped"
    if sigmoid and not softmax:
        return "sigmoid_topk"
    return "softmax_topk"


@functools.lru_cache(maxsize=256)
def _code(cls: type) -> str:
    """The class's source without comments and docstrings ("Sigmoid instead of softmax" is no softmax); cached per
    class (`inspect.getsource` parses the class's whole module: 0.3 s for a large modeling file)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return ""
    out, previous = [], tokenize.NEWLINE
    try:
        for tok in tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline):
            docstring = tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT,
                                                                     tokenize.DEDENT)
            if tok.type not in (tokenize.COMMENT, tokenize.NL) and not docstring:
                out.append(tok.string)
            if tok.type not in (tokenize.COMMENT, tokenize.NL):
                previous = tok.type
    except (tokenize.TokenError, IndentationError):
        return source
    return " ".join(out)

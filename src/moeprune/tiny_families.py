"""Tiny random models for every decoder-only MoE family of the *installed* transformers, from each family's own
config class.

`tiny_family_config(model_type)` shrinks the family's default config generically (`GENERIC`: hidden 32, heads
4 / kv 2 / head_dim 8, vocab 96, 8 routed experts of width 16, top-2, group-limited routers 2 groups / top-1 group,
per-layer lists cut to the tiny depth), then applies the family's `TINY_OVERRIDES` (what the generic rule cannot
know: MLA dims, layer patterns, mamba heads, nested sub-configs), then the caller's overrides. Multimodal wrappers
shrink their text config and get tiny towers. `tiny_family_model` builds it with the stock Auto class and
sharpens routers with `moeprune.tiny.sharpen_routers` (the one mechanism `tiny_model` uses), then gives every
selection / correction bias of shape [E] or [1, E] inside a MoE block a non-zero value.

`moe_model_types()` enumerates the families automatically: every model_type with a causal-LM, image-text-to-text
or multimodal-LM auto mapping whose tiny model has routed experts (a module named `experts` with a router
sibling). Wrappers and their text sub-models (`qwen3_5_moe` and `qwen3_5_moe_text`) are both kept when both
have such a mapping: they build different stock classes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from moeprune.log import logger
from moeprune.tiny import sharpen_routers
from moeprune.tiny_overrides import MIXED_LAYERS, NOT_BUILDABLE, TINY_OVERRIDES

__all__ = ["GENERIC", "MIXED_LAYERS", "NOT_BUILDABLE", "TINY_OVERRIDES", "moe_blocks", "moe_model_types",
           "tiny_family_config", "tiny_family_model"]

GENERIC = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               vocab_size=96, max_position_embeddings=128, initializer_range=0.1)
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
                     "moe_ffn_hidden_size")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k", "top_k_experts",
              "num_experts_per_token")
GROUP_KEYS = ("n_group", "num_expert_group", "moe_n_group")  # group-limited routing: 2 groups, the best one kept
# linear-attention (gated delta net) heads, where a family has them
LINEAR_ATTENTION = dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                        linear_num_value_heads=4)
# other weight dimensions families name their own way (dense / shared-expert widths, sparse-attention indexers,
# low-rank projections), shrunk wherever a text config has them
AUX_DIMS = dict(intermediate_size_mlp=48, dense_intermediate_size=48, ffn_hidden_size=48, shared_intermediate_size=16,
                shared_experts_intermediate_size=16, share_expert_dim=16, moe_shared_expert_intermediate_size=16,
                expert_ffn_hidden_size=16, moe_hidden_size=16, index_head_dim=8, index_n_heads=2, q_lora_rank=16,
                o_lora_rank=16, linear_head_dim=8, swa_head_dim=8, kv_channels=8, unpadded_vocab_size=96)
# a multimodal wrapper's own projector widths (projector output = the text hidden size)
WRAPPER_DIMS = dict(projector_hidden_size=32, out_hidden_size=32)
TINY_LAYERS = 4
# towers (vision / audio / ...) of multimodal wrappers: small enough to cost nothing, never run by a text forward
TOWER = dict(hidden_size=16, intermediate_size=32, num_heads=2, num_attention_heads=2, num_key_value_heads=2,
             depth=1, num_hidden_layers=1, num_layers=1, encoder_layers=1, out_hidden_size=32, head_dim=8,
             d_model=16, encoder_ffn_dim=32, encoder_attention_heads=2, output_dim=32, downsample_hidden_size=16,
             mlp_dim=32, output_channels=16, n_layers=1)
ROUTER_NAMES = ("gate", "router", "gating", "wg")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_lists(fields: dict) -> dict[str, list]:
    """The per-layer lists of a config's `fields`: lists as long as its num_hidden_layers."""
    depth = fields.get("num_hidden_layers")
    if not _is_int(depth) or depth < 2:
        return {}
    return {k: v for k, v in fields.items() if isinstance(v, list) and len(v) == depth and not k.endswith("_config")}


def _is_layer_index(values: list) -> bool:
    """A list naming, per layer, an earlier layer (kv_source_layers: where a layer reads its KV cache from)."""
    return all(_is_int(v) and 0 <= v <= i for i, v in enumerate(values))


def _pick_layers(lists: dict[str, list], depth: int, want: int = TINY_LAYERS, most: int = 6) -> list[int]:
    """Indices of the full model's layers the tiny one keeps: the first two layers of every distinct pattern
    (the tuple of per-layer values: attention kind x MLP kind ...), so a hybrid keeps each kind and at least two
    MoE layers; at most `most`, padded to `want` with the next layers. Lists of layer indices do not define
    patterns."""
    keys = [k for k, v in lists.items() if len({repr(x) for x in v}) < len(v) and not _is_layer_index(v)]
    sigs = [repr(tuple(lists[k][i] for k in keys)) for i in range(depth)]
    firsts = [sigs.index(s) for s in dict.fromkeys(sigs)]
    seconds = [i for i in range(depth) if i not in firsts and sigs[:i].count(sigs[i]) == 1]
    picked = firsts[:most]
    picked += [i for i in seconds if i not in picked][: most - len(picked)]
    picked += [i for i in range(depth) if i not in picked][: max(0, want - len(picked))]
    return sorted(picked)


def _take(values: list, keep: list[int]) -> list:
    """`values` at the kept layers; a layer-index list is renumbered (a layer whose source was dropped becomes its
    own source)."""
    if not _is_layer_index(values):
        return [values[i] for i in keep]
    return [keep.index(values[i]) if values[i] in keep else j for j, i in enumerate(keep)]


def _cut_layer_lists(fields: dict, layers: int | None) -> tuple[int, dict]:
    """(tiny depth, per-layer lists cut to it): a prefix of `layers` when the family fixes the depth, else the
    layers `_pick_layers` keeps."""
    lists = _layer_lists(fields)
    keep = list(range(layers or TINY_LAYERS))
    if layers is None and lists:
        keep = _pick_layers(lists, fields["num_hidden_layers"])
    return len(keep), {k: _take(v, keep) for k, v in lists.items()}


def _shrink_text(fields: dict, layers: int | None) -> dict:
    """The generic tiny kwargs for a decoder config, from its `to_dict()` fields (only for fields it has)."""
    def has_int(k, none_too=False):
        return k in fields and (_is_int(fields[k]) or (none_too and fields[k] is None))

    out = {k: v for k, v in GENERIC.items() if has_int(k)}
    out |= {k: v for k, v in (LINEAR_ATTENTION | AUX_DIMS).items() if has_int(k)}
    out |= {k: 16 for k in EXPERT_WIDTH_KEYS if has_int(k)}
    # counts that default to None (dots1, deepseek_v2) are set too: None there means "take it from the checkpoint"
    out |= {k: 8 for k in EXPERT_COUNT_KEYS if has_int(k, none_too=True)}
    out |= {k: 2 for k in TOP_K_KEYS if has_int(k, none_too=True)}
    for key in GROUP_KEYS:
        if has_int(key):
            out |= {key: 2, "topk_group": 1}
    out |= {k: v for k, v in dict(tie_word_embeddings=False, pad_token_id=0, initializer_range=0.1).items()
            if k in fields}
    out |= {k: v for k, v in dict(bos_token_id=1, eos_token_id=2).items() if fields.get(k) is not None}
    if has_int("kv_lora_rank"):  # multi-head latent attention: one kv head per query head
        out |= dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
        if has_int("qk_head_dim"):
            out["qk_head_dim"] = 16
    for key in ("first_k_dense_replace", "num_dense_layers"):  # a leading dense layer, then MoE layers
        if has_int(key) and fields[key] > 0:
            out[key] = 1
    if fields.get("mlp_only_layers"):
        out["mlp_only_layers"] = [0]
    if "num_hidden_layers" in fields:
        out["num_hidden_layers"], lists = _cut_layer_lists(fields, layers)
        out |= lists
    return out


def _shrink_tower(fields: dict) -> dict:
    return {k: v for k, v in TOWER.items() if _is_int(fields.get(k))} | _cut_layer_lists(fields, 1)[1]


def _fields(cfg) -> dict:
    """A config's fields without derived per-layer settings (regenerated for the tiny depth)."""
    fields = cfg.to_dict()
    fields.pop("per_layer_config", None)
    fields.pop("model_type", None)
    return fields


def _merge(base: dict, over: dict) -> dict:
    """`base` updated by `over`, recursing into nested dicts (sub-config overrides)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _tiny_kwargs(cfg, text, over: dict) -> dict:
    """Generic tiny kwargs of `cfg` (recursing into sub-configs), merged with the family overrides `over`."""
    if cfg is text:
        return _merge(_shrink_text(_fields(cfg), over.get("num_hidden_layers")), over)
    out = {}
    for key in getattr(cfg, "sub_configs", {}):
        sub = getattr(cfg, key, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        if _contains(sub, text) or _is_decoder(sub):
            out[key] = _fields(sub) | _tiny_kwargs(sub, text if _contains(sub, text) else sub, over.get(key, {}))
        else:
            out[key] = _fields(sub) | _tiny_tower(sub, over.get(key, {}))
    fields = cfg.to_dict()
    top = {k: v for k, v in WRAPPER_DIMS.items() if _is_int(fields.get(k))}
    if "tie_word_embeddings" in fields:
        top["tie_word_embeddings"] = False
    return out | top | {k: v for k, v in over.items() if k not in out}


def _tiny_tower(cfg, over: dict) -> dict:
    """A vision / audio tower (and its own sub-configs): one narrow layer."""
    out = _shrink_tower(_fields(cfg))
    for key in getattr(cfg, "sub_configs", {}):
        sub = getattr(cfg, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out[key] = _fields(sub) | _tiny_tower(sub, over.get(key, {}))
    return _merge(out, over)


def _is_decoder(cfg) -> bool:
    """A sub-config that is itself a language decoder (an omni model's thinker and talker): shrunk like text."""
    fields = cfg.to_dict()
    return "vocab_size" in fields and "num_hidden_layers" in fields and not getattr(cfg, "sub_configs", None)


def _contains(cfg, text) -> bool:
    return cfg is text or any(_contains(getattr(cfg, k), text) for k in getattr(cfg, "sub_configs", {})
                              if getattr(cfg, k, None) is not None)


def tiny_family_config(model_type: str, **overrides):
    """The tiny config of `model_type`: generic shrink, then `TINY_OVERRIDES[model_type]`, then `overrides`
    (nested dicts update sub-configs key by key)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    text = default.get_text_config() if hasattr(default, "get_text_config") else default
    over = _merge(TINY_OVERRIDES.get(model_type, {}), overrides)
    return AutoConfig.for_model(model_type, **_tiny_kwargs(default, text, over))


def _expert_count(experts: torch.nn.Module) -> int:
    """Routed experts in a container: ModuleList length, else its `num_experts`, else the fused leading dim."""
    if isinstance(experts, torch.nn.ModuleList):
        return len(experts)
    n = getattr(experts, "num_experts", None)
    if _is_int(n):
        return n
    dims = [p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3]
    return min(dims) if dims else 0


def moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.nn.Module, int]]:
    """(block name, router module, experts module, number of experts) for every module named `experts` with a
    router sibling (a child named gate/router/... or whose class name ends in Router / Gate)."""
    out = []
    for name, experts in model.named_modules():
        if name.rsplit(".", 1)[-1] != "experts" or "." not in name:
            continue
        parent_name = name.rsplit(".", 1)[0]
        parent = model.get_submodule(parent_name)
        routers = [m for n, m in parent.named_children() if "shared" not in n and (
            n in ROUTER_NAMES or re.search(r"(Router|Gate)$", type(m).__name__))]
        if routers:
            out.append((parent_name, routers[0], experts, _expert_count(experts)))
    return out


@torch.no_grad()
def _bias_the_selection(model: torch.nn.Module, touched: set[int]) -> None:
    """Non-zero values for every [E] / [1, E] tensor of a MoE block outside its experts (correction / selection
    biases: e_score_correction_bias, expert_bias, moe_statics, ...), so a reference that forgets one is caught."""
    for block, _, experts, n in moe_blocks(model):
        inside = {id(t) for t in [*experts.parameters(), *experts.buffers()]}
        parent = model.get_submodule(block)
        for t in [*parent.parameters(), *parent.buffers()]:
            if id(t) in inside or id(t) in touched or not t.is_floating_point() or t.shape[-1:] != (n,):
                continue
            if t.dim() == 1 or (t.dim() == 2 and t.shape[0] == 1):
                t.normal_(0, 0.05)
                touched.add(id(t))


@torch.no_grad()
def tiny_family_model(model_type: str, seed: int = 0, router_scale: float = 4.0, **overrides):
    """The tiny random model of `model_type` (float32, eval) with sharp routers and non-zero selection biases."""
    from moeprune.io.stock import auto_class

    torch.manual_seed(seed)
    config = tiny_family_config(model_type, **overrides)
    with _nan_filled_allocations():  # what `_init_weights` leaves alone is NaN, never a stale but plausible value
        model = auto_class(config).from_config(config, dtype=torch.float32).eval()
    _initialise_leftovers(model, seed)
    blocks = moe_blocks(model)
    routers = [p for _, router, _, n in blocks for p in router.parameters() if p.dim() == 2 and p.shape[0] == n]
    touched = sharpen_routers(model, router_scale, routers)
    _bias_the_selection(model, touched)
    return model


@contextmanager
def _nan_filled_allocations() -> Iterator[None]:
    """torch fills new floating-point allocations with NaN while deterministic algorithms are on
    (`torch.utils.deterministic.fill_uninitialized_memory`); warn-only, so no construction op is refused."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


GARBAGE = 1e3  # no initialised weight of a tiny random model comes near this (normal std 0.02, norms 1) ...
DENORMAL = 1e-30  # ... nor this close to zero without being zero


@torch.no_grad()
def _initialise_leftovers(model: torch.nn.Module, seed: int) -> None:
    """Parameters the family's `_init_weights` leaves as allocated (Qwen3-Omni-MoE's talker experts: NaN since
    `tiny_family_model` builds under `_nan_filled_allocations`; before, whatever the heap held: 1e14, 1e-43, zeros,
    or a freed tensor's plausible weights, in some processes and not others) get a seeded
    normal(0, initializer_range) draw; they are recognised by a non-finite value, one above `GARBAGE`, a largest
    magnitude that is not zero but below `DENORMAL`, or, for a routed expert's weights (never zero-initialised), all
    zeros."""
    g = torch.Generator().manual_seed(seed)
    std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
    experts = {id(p) for _, _, e, _ in moe_blocks(model) for n, p in e.named_parameters()
               if p.dim() >= 2 and "bias" not in n}  # weights; biases may start at zero (gpt-oss)
    for name, p in model.named_parameters():
        if not p.is_floating_point() or not p.numel():
            continue
        top = float(p.abs().max())
        zero_expert = top == 0 and id(p) in experts
        if zero_expert or not (torch.isfinite(p).all() and top < GARBAGE and (top == 0 or top > DENORMAL)):
            logger.debug("tiny %s: %s left uninitialised by its family; drawn anew", type(model).__name__, name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def _mapped_model_types() -> list[str]:
    """model_types with a causal-LM / image-text-to-text / multimodal-LM mapping whose modeling source mentions
    experts (the cheap prefilter)."""
    import transformers

    from moeprune.compat import (
        CONFIG_MAPPING_NAMES,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
        model_type_to_module_name,
    )

    mapped = (set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
              | set(MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES))
    root = Path(transformers.__file__).parent / "models"
    out = []
    for model_type in CONFIG_MAPPING_NAMES:
        if model_type not in mapped:
            continue
        folder = root / model_type_to_module_name(model_type)
        if any("experts" in f.read_text() for f in folder.glob("modeling_*.py")):
            out.append(model_type)
    return out


def _has_routed_experts(model_type: str) -> bool:
    """Build the tiny model on the meta device (no memory, no init; on the CPU if meta fails) and look for routed
    experts. A family whose tiny model does not build counts when `NOT_BUILDABLE` names it."""
    from moeprune.io.stock import auto_class

    for device in ("meta", "cpu"):
        try:
            config = tiny_family_config(model_type)
            with torch.device(device):
                model = auto_class(config).from_config(config)
        except Exception as exc:  # noqa: BLE001 - judged below
            logger.debug("tiny %s does not build on %s: %s", model_type, device, exc)
            continue
        return bool(moe_blocks(model))
    return model_type in NOT_BUILDABLE


def moe_model_types() -> list[str]:
    """The MoE families of the installed transformers (see the module docstring), sorted; families in
    `NOT_BUILDABLE` are kept (their modeling source has experts) so callers can report them."""
    return list(_moe_model_types())


@functools.cache
def _moe_model_types() -> tuple[str, ...]:
    return tuple(sorted(t for t in _mapped_model_types() if _has_routed_experts(t)))

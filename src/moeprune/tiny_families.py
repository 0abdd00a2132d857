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
from pathlib import Path

import torch

from moeprune.log import logger
from moeprune.tiny import sharpen_routers
from moeprune.tiny_overrides import NOT_BUILDABLE, TINY_OVERRIDES

__all__ = ["GENERIC", "NOT_BUILDABLE", "TINY_OVERRIDES", "moe_blocks", "moe_model_types", "tiny_family_config",
           "tiny_family_model"]

GENERIC = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               vocab_size=96, max_position_embeddings=128, initializer_range=0.1)
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
                     "moe_ffn_hidden_size")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k")
TINY_LAYERS = 4
# towers (vision / audio / ...) of multimodal wrappers: small enough to cost nothing, never run by a text forward
TOWER = dict(hidden_size=16, intermediate_size=32, num_heads=2, num_attention_heads=2, num_key_value_heads=2,
             depth=1, num_hidden_layers=1, num_layers=1, encoder_layers=1, out_hidden_size=32, head_dim=8)
ROUTER_NAMES = ("gate", "router", "gating", "wg")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cut_layer_lists(cfg, layers: int) -> dict:
    """Every per-layer list of `cfg` (length == its num_hidden_layers) cut to `layers` entries. `layer_types`
    keeps one layer of each kind when the prefix would miss a kind (hybrid models need both)."""
    depth = getattr(cfg, "num_hidden_layers", None)
    out = {}
    if not _is_int(depth):
        return out
    for key, value in cfg.to_dict().items():
        if not isinstance(value, list) or len(value) != depth or key.endswith("_config"):
            continue
        prefix = value[:layers]
        if key == "layer_types":
            kinds = list(dict.fromkeys(value))
            missing = [k for k in kinds if k not in prefix]
            prefix = prefix[: layers - len(missing)] + missing if missing else prefix
        out[key] = prefix
    return out


def _shrink_text(cfg, layers: int) -> dict:
    """The generic tiny kwargs for a decoder config (only for fields it has)."""
    out = {k: v for k, v in GENERIC.items() if hasattr(cfg, k) and _is_int(getattr(cfg, k, None))}
    if hasattr(cfg, "initializer_range"):
        out["initializer_range"] = GENERIC["initializer_range"]
    out |= {k: 16 for k in EXPERT_WIDTH_KEYS if _is_int(getattr(cfg, k, None))}
    out |= {k: 8 for k in EXPERT_COUNT_KEYS if _is_int(getattr(cfg, k, None))}
    out |= {k: 2 for k in TOP_K_KEYS if _is_int(getattr(cfg, k, None))}
    if _is_int(getattr(cfg, "n_group", None)):
        out |= dict(n_group=2, topk_group=1)
    if hasattr(cfg, "tie_word_embeddings"):
        out["tie_word_embeddings"] = False
    if hasattr(cfg, "pad_token_id"):
        out["pad_token_id"] = 0
    if hasattr(cfg, "num_hidden_layers"):
        out["num_hidden_layers"] = layers
        out |= _cut_layer_lists(cfg, layers)
    return out


def _shrink_tower(cfg) -> dict:
    return {k: v for k, v in TOWER.items() if _is_int(getattr(cfg, k, None))} | _cut_layer_lists(cfg, 1)


def _merge(base: dict, over: dict) -> dict:
    """`base` updated by `over`, recursing into nested dicts (sub-config overrides)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _tiny_kwargs(cfg, text, over: dict) -> dict:
    """Generic tiny kwargs of `cfg` (recursing into sub-configs), merged with the family overrides `over`."""
    if cfg is text:
        layers = over.get("num_hidden_layers", TINY_LAYERS)
        return _merge(_shrink_text(cfg, layers), over)
    out = {}
    for key in getattr(cfg, "sub_configs", {}):
        sub = getattr(cfg, key, None)
        if sub is None:
            continue
        if _contains(sub, text):
            out[key] = sub.to_dict() | _tiny_kwargs(sub, text, over.get(key, {}))
        else:
            out[key] = sub.to_dict() | _merge(_shrink_tower(sub), over.get(key, {}))
        out[key].pop("model_type", None)
    top = {k: v for k, v in over.items() if k not in out}
    if hasattr(cfg, "tie_word_embeddings"):
        top.setdefault("tie_word_embeddings", False)
    return out | top


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
    model = auto_class(config).from_config(config, dtype=torch.float32).eval()
    blocks = moe_blocks(model)
    routers = [p for _, router, _, n in blocks for p in router.parameters() if p.dim() == 2 and p.shape[0] == n]
    touched = sharpen_routers(model, router_scale, routers)
    _bias_the_selection(model, touched)
    return model


def _mapped_model_types() -> list[str]:
    """model_types with a causal-LM / image-text-to-text / multimodal-LM mapping whose modeling source mentions
    experts (the cheap prefilter)."""
    import transformers
    from transformers.models.auto import configuration_auto as ca
    from transformers.models.auto import modeling_auto as ma

    mapped = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    mapped |= set(getattr(ma, "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", {}))
    root = Path(transformers.__file__).parent / "models"
    out = []
    for model_type in ca.CONFIG_MAPPING_NAMES:
        if model_type not in mapped:
            continue
        folder = root / ca.model_type_to_module_name(model_type)
        if any("experts" in f.read_text() for f in folder.glob("modeling_*.py")):
            out.append(model_type)
    return out


def _has_routed_experts(model_type: str) -> bool:
    """Build the tiny model on the meta device (no memory, no init) and look for routed experts."""
    from moeprune.io.stock import auto_class

    try:
        config = tiny_family_config(model_type)
        with torch.device("meta"):
            model = auto_class(config).from_config(config)
    except Exception as exc:  # noqa: BLE001 - a family that cannot build tiny is judged by NOT_BUILDABLE
        logger.debug("tiny %s does not build: %s", model_type, exc)
        return model_type in NOT_BUILDABLE
    return bool(moe_blocks(model))


def moe_model_types() -> list[str]:
    """The MoE families of the installed transformers (see the module docstring), sorted; families in
    `NOT_BUILDABLE` are kept (their modeling source has experts) so callers can report them."""
    return list(_moe_model_types())


@functools.cache
def _moe_model_types() -> tuple[str, ...]:
    return tuple(sorted(t for t in _mapped_model_types() if _has_routed_experts(t)))

"""Structural fallback for MoE models without a registered adapter (remote-code and older models).

Recognised when the config holds an expert count and a top-k, and either the in-memory model or the checkpoint
keys show `layers.N.(mlp|block_sparse_moe).(gate|router)` next to `...experts...` — the `ModuleList`-of-MLP
layout (`experts.J.gate_proj/up_proj/down_proj` or `w1/w2/w3`) or fused 3-D tensors. Routing is assumed to be
softmax-based (softmax top-k, or top-k then softmax): verification masks the router's logits inside the model's own
router, which is exact for any softmax-based router whatever its renormalisation. Sigmoid routers with an
`e_score_correction_bias` (DeepSeek-style) are refused here: masking logits is not enough for them, they need a
registered adapter with `sigmoid_grouped` routing.
"""

from __future__ import annotations

import re
from typing import Any

from moeprune.models.base import MoEAdapter
from moeprune.models.keys import COUNT_KEYS, TOP_K_KEYS

BLOCK_NAMES = ("mlp", "block_sparse_moe", "moe", "feed_forward")
ROUTER_NAMES = ("gate", "router")


class GenericMoEAdapter(MoEAdapter):
    family = "generic"
    model_types = ()

    def __init__(self, config: Any, count_key: str, top_k_key: str, layers: list[int], block: str, router: str):
        self.count_key = count_key
        self.top_k_key = top_k_key
        self._layers = sorted(layers)
        self.block_name = block
        self.disk_block_names = (block,)
        self.router_name = router
        super().__init__(config)
        if getattr(self.config, self.intermediate_key, None) is None:
            self.intermediate_key = "intermediate_size"

    def moe_layers(self) -> list[int]:
        return list(self._layers)

    @classmethod
    def detect(cls, config: Any, model: Any = None, weight_keys: list[str] | None = None):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        count_key = next((k for k in COUNT_KEYS if isinstance(getattr(text, k, None), int)), None)
        top_k_key = next((k for k in TOP_K_KEYS if isinstance(getattr(text, k, None), int)), None)
        if count_key is None or top_k_key is None:
            return None
        found = _scan_model(model) if model is not None else _scan_keys(weight_keys or [])
        if found is None or _has_correction_bias(model, weight_keys):
            return None
        layers, block, router = found
        return cls(config, count_key, top_k_key, layers, block, router)


def _scan_model(model: Any) -> tuple[list[int], str, str] | None:
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.(\w+)$")
    layers, block_name, router_name = [], None, None
    for name, module in model.named_modules():
        m = pattern.search(name)
        if not m or m.group(2) not in BLOCK_NAMES or not hasattr(module, "experts"):
            continue
        router = next((r for r in ROUTER_NAMES if hasattr(module, r)), None)
        if router is None:
            continue
        layers.append(int(m.group(1)))
        block_name, router_name = m.group(2), router
    return (sorted(set(layers)), block_name, router_name) if layers else None  # once each: a second decoder (an
    # omni model's talker) repeats the indices


def _scan_keys(keys: list[str]) -> tuple[list[int], str, str] | None:
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.(\w+)\.(experts|gate|router)\.")
    experts: dict[tuple[int, str], set[str]] = {}
    for key in keys:
        m = pattern.search(key)
        if m and m.group(2) in BLOCK_NAMES:
            experts.setdefault((int(m.group(1)), m.group(2)), set()).add(m.group(3))
    hits = [(layer, block, parts) for (layer, block), parts in experts.items() if "experts" in parts]
    hits = [(layer, block, parts) for layer, block, parts in hits if parts & set(ROUTER_NAMES)]
    if not hits:
        return None
    block = hits[0][1]
    router = next(r for r in ROUTER_NAMES if r in hits[0][2])
    return sorted(layer for layer, _, _ in hits), block, router


def _has_correction_bias(model: Any, keys: list[str] | None) -> bool:
    names = [n for n, _ in model.named_buffers()] if model is not None else list(keys or [])
    return any(n.endswith("e_score_correction_bias") for n in names)

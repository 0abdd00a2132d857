"""Config keys that different families use for the same fact (aliases, in the order they are tried), and access to
keys inside a sub-config (`get_key` / `set_key`: "ffn_config.moe_num_experts")."""

from __future__ import annotations

from typing import Any

COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")  # routed experts E
# experts per token k
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "top_k_experts")


def get_key(config: Any, key: str, default: Any = None) -> Any:
    """The value of `key` in a config object or config.json dict; a dotted key reads a sub-config
    ("ffn_config.moe_num_experts": DBRX keeps its counts in `ffn_config`). `default` when any part is missing."""
    target = config
    for part in key.split("."):
        target = target.get(part, None) if isinstance(target, dict) else getattr(target, part, None)
        if target is None:
            return default
    return target


def set_key(config: Any, key: str, value: Any) -> None:
    """Set `key` (dotted: inside a sub-config, as `get_key`) in a config object or config.json dict."""
    head, _, last = key.rpartition(".")
    target = get_key(config, head) if head else config
    if target is None:
        raise KeyError(f"config has no sub-config {head!r} to hold {last!r}")
    if isinstance(target, dict):
        target[last] = value
    else:
        setattr(target, last, value)

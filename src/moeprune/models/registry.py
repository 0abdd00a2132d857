"""Adapter registry: `model_type` -> adapter class, plus the structural fallback for unknown MoE models."""

from __future__ import annotations

from typing import Any

from moeprune.errors import MoePruneError
from moeprune.models.keys import COUNT_KEYS
from moeprune.registry import Registry

ADAPTERS: Registry[type] = Registry(
    "model family",
    hint="To add one, write a small adapter in src/moeprune/models/ (see docs/adding-a-model.md).",
)


# model_type -> why moeprune cannot prune it (filled by models/families.py; checked before any adapter)
REFUSED: dict[str, str] = {}


def register_adapter(cls: type) -> type:
    for model_type in cls.model_types:
        ADAPTERS.register(model_type, cls)
    return cls


def supported_families() -> list[str]:
    return list(ADAPTERS)


def looks_like_moe(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any((getattr(text, k, None) or 0) > 0 for k in COUNT_KEYS if isinstance(getattr(text, k, None), int))


def get_adapter(config: Any, model: Any = None, weight_keys: list[str] | None = None):
    """The adapter for `config` (registered by model_type), else the generic one when the structure is MoE.

    Raises a MoePruneError that says whether the model is not MoE at all or just not supported yet.
    """
    import moeprune.models  # noqa: F401  (registers the families)
    from moeprune.models.generic import GenericMoEAdapter

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", "?")
    for candidate in (model_type, getattr(config, "model_type", None)):
        if candidate in REFUSED:
            raise MoePruneError(f"model_type {candidate!r} cannot be pruned by moeprune: {REFUSED[candidate]}")
        if candidate in ADAPTERS:
            return ADAPTERS.get(candidate)(config)
    if not looks_like_moe(config):
        raise MoePruneError(
            f"model_type {model_type!r} is not a Mixture-of-Experts model: its config has none of "
            f"{', '.join(COUNT_KEYS)}. moeprune prunes routed experts; nothing to do for a dense model."
        )
    detected = GenericMoEAdapter.detect(config, model=model, weight_keys=weight_keys)
    if detected is not None:
        return detected
    raise MoePruneError(
        f"unknown MoE architecture {model_type!r}: no adapter is registered and its layout was not recognised "
        f"(expected a router '.gate'/'.router' and '.experts' inside '.mlp'/'.block_sparse_moe'). "
        f"Supported families: {', '.join(supported_families())}. To add one, write a small adapter in "
        f"src/moeprune/models/ (see docs/adding-a-model.md)."
    )

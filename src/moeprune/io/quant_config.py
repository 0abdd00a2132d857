"""Where a checkpoint's config.json keeps its `quantization_config` (read by the quantized-input loader, `io/quant.py`,
and by the compressed-tensors decompressor, `quant/load.py`)."""

from __future__ import annotations

NESTED = ("text_config", "language_config", "llm_config")  # multimodal configs nest the language model's


def quantization_dict(config_dict: dict) -> dict | None:
    """config.json's quantization_config (top level, or in a nested text config), or None."""
    for cfg in (config_dict, *(config_dict.get(k) for k in NESTED)):
        if isinstance(cfg, dict) and cfg.get("quantization_config") is not None:
            return cfg["quantization_config"]
    return None

"""The stock transformers pieces every loader shares: dtype names and the Auto class that builds a config."""

from __future__ import annotations

import torch

from moeprune.errors import MoePruneError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise MoePruneError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def auto_class(config):
    """The stock Auto class that builds this config's generative model: CausalLM, else image-text-to-text
    (vision-language MoEs such as Qwen3-VL-MoE nest their text decoder under `text_config`), else the multimodal
    LM class (omni models such as Qwen3-Omni-MoE)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM):
        if type(config) in auto._model_mapping:
            return auto
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):  # remote code (io/remote.py)
        return AutoModelForCausalLM
    raise MoePruneError(
        f"stock transformers has no causal-LM or image-text-to-text class for {type(config).__name__}; "
        "moeprune cannot load it."
    )

"""Loading models with stock transformers, offline."""

from __future__ import annotations

from pathlib import Path

import torch

from moeprune.errors import MoePruneError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise MoePruneError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu"):
    """`AutoModelForCausalLM.from_pretrained(path)` from local files only, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=parse_dtype(dtype), local_files_only=True)
    return model.to(device).eval()

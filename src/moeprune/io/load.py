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


def auto_class(config):
    """The stock Auto class that builds this config's generative model: CausalLM, else image-text-to-text
    (vision-language MoEs such as Qwen3-VL-MoE nest their text decoder under `text_config`)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise MoePruneError(
        f"stock transformers has no causal-LM or image-text-to-text class for {type(config).__name__}; "
        "moeprune cannot load it."
    )


@torch.no_grad()
def match_disk_dtypes(model, disk_dtypes: dict[str, torch.dtype]) -> list[str]:
    """Cast parameters/buffers back to the dtype their checkpoint stores (transformers upcasts some, e.g.
    DeepSeek's e_score_correction_bias to float32), so saving the model preserves every tensor's dtype."""
    changed = []
    for name, t in list(model.state_dict(keep_vars=True).items()):
        want = disk_dtypes.get(name)
        if want is not None and t.dtype != want and t.is_floating_point():
            t.data = t.data.to(want)
            changed.append(name)
    return changed


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu"):
    """`Auto*.from_pretrained(path)` (the stock class for this config) from local files only, in eval mode.

    Loads any moeprune output: non-uniform expert widths (which stock `from_pretrained` refuses by design) go
    through `io.nonuniform.load_nonuniform`."""
    import json

    from transformers import AutoConfig

    from moeprune.io import nonuniform

    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file() and nonuniform.is_nonuniform(json.loads(cfg_file.read_text())):
        return nonuniform.load_nonuniform(path, dtype).to(device).eval()

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = auto_class(config).from_pretrained(str(path), dtype=parse_dtype(dtype), local_files_only=True)
    return model.to(device).eval()

"""The stock transformers pieces every loader shares: dtype names, the Auto class that builds a config, and the
text model's forward for a wrapper class that has none (`runnable`)."""

from __future__ import annotations

from functools import cache

import torch

from moeprune.errors import MoePruneError

# "auto" / "stored": the checkpoint's own dtype, as `from_pretrained(dtype="auto")` resolves it (calibration's
# "auto" first goes through `compute_dtype`)
DTYPES = {"auto": "auto", "stored": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


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


def runnable(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, callable on token ids. A wrapper class without a forward of its own (Qwen3-Omni-MoE's
    ForConditionalGeneration only generates: its thinker and talker run apart) gets, on this instance only, the
    forward and the input / output embeddings of the one child whose config holds the model's text config (the
    thinker, whose decoder moeprune prunes). The class, the state dict and what `save_pretrained` writes are
    unchanged."""
    if type(model).forward is not torch.nn.Module.forward:
        return model
    text = model.config.get_text_config()
    owners = [child for _, child in model.named_children()
              if getattr(child, "config", None) is not None and child.config.get_text_config() is text]
    if len(owners) != 1 or type(owners[0]).forward is torch.nn.Module.forward:
        raise MoePruneError(f"{type(model).__name__} has no forward, and moeprune found {len(owners)} sub-models "
                            "that hold its text model; it cannot run this model on calibration or evaluation text.")
    owner = owners[0]
    model.forward = owner.forward
    model.get_input_embeddings = owner.get_input_embeddings
    model.get_output_embeddings = owner.get_output_embeddings
    return model


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively: torch sends bf16 matmuls to oneDNN only where
    `mkldnn_bf16_device_check` holds (AVX-512 BW/VL/DQ or AMX on x86, BF16 on Arm); elsewhere (AVX2-only x86)
    it falls back to a scalar path. Measured on an AVX2 host: one Qwen3-MoE block (128 experts, top-8, H=1024,
    2048 tokens, one thread) took 5.4 s in bf16 against 1.1 s in float32 (`benchmarks/compute_dtype.py`)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except (RuntimeError, AttributeError):  # a build without oneDNN: no evidence either way, keep the checkpoint's
        return True


def compute_dtype(requested: str, device: str) -> str:
    """The dtype calibration computes in, from `--dtype`.

    - a dtype name: that dtype;
    - "stored": the checkpoint's own dtype (what the loaders' "auto" means);
    - "auto": the checkpoint's, except on a CPU without native bf16 matmul (`cpu_has_native_bf16`), where float32.
      There a bf16 checkpoint runs about 5x faster in float32, at twice the bytes per loaded layer (the
      in-memory / layer-by-layer choice, `io.fit.choose_lazy`, counts them), and every sum is at least as exact.
    """
    parse_dtype(requested)  # "stored" stays "stored": resolving again (dataclasses.replace) must not change it
    if requested != "auto" or not device.startswith("cpu") or cpu_has_native_bf16():
        return requested
    return "float32"


def config_dtype(config) -> torch.dtype | None:
    """The dtype a config says its weights are stored in (`dtype`, older `torch_dtype`; a name or a torch.dtype);
    None when it says nothing."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d.removeprefix("torch."), None)
    return d if isinstance(d, torch.dtype) else None


def say_compute_dtype(dtype: str, stored: str | None) -> None:
    """One log line when calibration computes in another dtype than the checkpoint stores."""
    from moeprune.log import logger

    if dtype in ("auto", "stored") or stored is None or stored == dtype:
        return
    why = ("; --dtype auto chooses float32 on a CPU without native bf16 matmul (about 5x faster there), --dtype "
           "stored keeps the checkpoint's" if not cpu_has_native_bf16() else "")
    logger.info("calibration computes in %s (the checkpoint stores %s)%s", dtype, stored, why)

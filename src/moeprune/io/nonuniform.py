"""Checkpoints whose MoE layers have different expert widths (neuron pruning with `layer`/`global` budgets).

Stock configs hold one expert width, so such a folder cannot be described to `transformers`. moeprune saves it
with the family's own tensor names and shapes, but with

    config.json: "model_type": "moeprune_nonuniform__load_with_moeprune.load_model",
                 "moeprune_nonuniform": {"model_type": "<the real one>", "widths": {"<layer>": I_l, ...},
                                         "kept": {"<layer>": {"<expert>": n_j, ...}}}

so that a plain `AutoModelForCausalLM.from_pretrained` (or vLLM) fails at once with an error that names the
loader, instead of loading something wrong. Within a layer every expert is stored at the layer's width I_l
(the widest expert of the layer, rounded up to a multiple of 8): narrower experts are padded with zero neurons
(zero gate/up rows and zero down columns contribute exactly 0), and `kept` records the real counts. The config
keeps the original width under the family's key (DeepSeek-style shared experts are sized from it).

`load_nonuniform(path)` rebuilds the stock model class from the restored config on `meta`, reshapes each MoE
layer's expert parameters to I_l, and reads every tensor through transformers' own converters (`io/lazy.py`).

The config side (sentinel, `is_nonuniform`, `restored_config`, `widths`, `mark`) lives in `io/nonuniform_config.py`
so that `io/checkpoint.py` can read it without importing the loader; every name is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.lazy import LazyModel, load_lazy
from moeprune.io.nonuniform_config import KEY, SENTINEL, is_nonuniform, mark, restored_config, widths
from moeprune.models import get_adapter
from moeprune.models.fused_styles import style_of
from moeprune.models.layouts import WIDTH_ATTRS

__all__ = ["KEY", "SENTINEL", "is_nonuniform", "load_lazy_any", "load_nonuniform", "mark", "resize_experts",
           "restored_config", "widths"]


def resize_experts(experts: nn.Module, style: str, width: int) -> None:
    """Give a (meta) experts module the expert width `width`: fused tensors and width attributes."""
    import torch

    def new(name: str, shape: list[int]) -> None:
        p = getattr(experts, name)
        setattr(experts, name, nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device),
                                            requires_grad=p.requires_grad))

    if isinstance(experts, nn.ModuleList):
        raise MoePruneError("non-uniform widths are stored for fused experts only.")
    fused = style_of(experts, style)
    old = fused.width(experts)
    for name, shape in fused.resized_shapes(experts, width).items():
        new(name, shape)
    for a in WIDTH_ATTRS:
        if getattr(experts, a, None) == old:
            setattr(experts, a, width)


def load_lazy_any(path: str | Path, dtype: str = "auto", *, head: bool = True) -> LazyModel:
    """Any checkpoint moeprune reads or writes as a `LazyModel` (decoder layers on meta until used): a non-uniform
    one with each MoE layer's expert parameters reshaped to its width first."""
    ckpt = Checkpoint.open(path)
    if not is_nonuniform(ckpt.config_dict):
        return load_lazy(ckpt.path, dtype, head=head)
    config = restored_config(ckpt.config_dict)
    adapter = get_adapter(config)
    layer_widths = widths(ckpt.config_dict)

    def prepare(model: nn.Module) -> None:
        for layer, width in layer_widths.items():
            resize_experts(adapter.experts(adapter.block(model, layer)), adapter.fused_style, width)

    return load_lazy(ckpt.path, dtype, head=head, config=config, prepare=prepare)


def load_nonuniform(path: str | Path, dtype: str = "auto"):
    """A non-uniform moeprune checkpoint as the stock model class with per-layer expert widths, in eval mode."""
    return load_lazy_any(path, dtype).materialise()

"""Build a layer's wide parameters in their narrow stored dtype, then widen once (`LazyModel.layer`).

A bf16 checkpoint computed in float32 (`--dtype auto` on a CPU without native bf16 matmul, or `--dtype float32`)
is read by transformers' loader as: each per-expert tensor cast to float32, then stacked (`MergeModulelist`), then
gate and up concatenated (`Concatenate`): every copy at 4 bytes per value. Those converters only move values, and
bf16 -> float32 is exact, so building the fused tensor in bf16 and casting it once gives the same bits with half
the bytes copied. Measured on one decoder layer of `benchmarks/big_model.py`'s checkpoint (128 experts, H=1024,
width 448): 2.4 s and 550 k page faults per layer read in float32, 1.5 s and 406 k read narrow then widened.

A parameter is read narrow only when
- the checkpoint is not quantized (dequantization is arithmetic: its rounding depends on the output dtype);
- every checkpoint tensor that feeds it has the same 16-bit float dtype on disk, narrower than the parameter's;
- the converter that builds it (if any) only moves values (`COPY_OPS`): a converter doing arithmetic would round
  differently in the narrow dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

NARROW = {"BF16": torch.bfloat16, "F16": torch.float16}  # safetensors dtype names
# transformers' conversion ops that only copy, split, concatenate, stack, transpose or permute values
COPY_OPS = frozenset({"_IdentityOp", "Chunk", "Split", "Concatenate", "Interleave", "MergeModulelist",
                      "SplitModulelist", "Transpose", "PermuteForRope"})


def copies_only(converter) -> bool:
    """Whether a transformers WeightConverter (None: a plain rename) moves values without arithmetic."""
    if converter is None:
        return True
    return all(type(op).__name__ in COPY_OPS for op in getattr(converter, "operations", ()))


def narrow_params(meta_params: dict[str, torch.Tensor], feeds: dict[str, list], copy_only: dict[str, bool],
                  quantized: bool) -> dict[str, torch.dtype]:
    """{parameter name: the dtype to read it in} for the parameters that may be read narrow (module docstring).
    `feeds`: parameter -> the checkpoint entries (with a safetensors `dtype` name) that feed it; `copy_only`:
    parameter -> whether its converter only moves values."""
    if quantized:
        return {}
    out = {}
    for name, entries in feeds.items():
        param = meta_params.get(name)
        kinds = {e.dtype for e in entries}
        if param is None or len(kinds) != 1 or not copy_only.get(name, False):
            continue
        narrow = NARROW.get(kinds.pop())
        if narrow is not None and param.is_floating_point() and param.element_size() > narrow.itemsize:
            out[name] = narrow
    return out


def set_meta_dtypes(model: nn.Module, dtypes: Iterable[tuple[str, torch.dtype]]) -> None:
    """Give each named meta parameter a meta tensor of the given dtype (the loader then reads it in that dtype)."""
    for name, dtype in dtypes:
        owner, leaf = _owner(model, name)
        p = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"),
                                               requires_grad=p.requires_grad)


def widen(model: nn.Module, dtypes: Iterable[tuple[str, torch.dtype]]) -> None:
    """Cast each named (now loaded) parameter to the given dtype, in place of its narrow storage."""
    for name, dtype in dtypes:
        owner, leaf = _owner(model, name)
        p = owner._parameters[leaf]
        p.data = p.data.to(dtype)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf

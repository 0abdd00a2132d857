"""Loading models with stock transformers, offline.

`parse_dtype`, `auto_class` and `DTYPES` live in `io/stock.py` (the lazy loader needs them too) and are
importable from here as before."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeprune.io import nonuniform
from moeprune.io.quant import is_quantized_dtype, quant_format
from moeprune.io.remote import trusted
from moeprune.io.stock import DTYPES, auto_class, parse_dtype, runnable

__all__ = ["DTYPES", "auto_class", "load_model", "match_disk_dtypes", "parse_dtype"]


@torch.no_grad()
def match_disk_dtypes(model, disk_dtypes: dict[str, torch.dtype]) -> list[str]:
    """Cast parameters/buffers back to the dtype their checkpoint stores (transformers upcasts some, e.g.
    DeepSeek's e_score_correction_bias to float32), so saving the model preserves every tensor's dtype.
    Quantized storage (float8 weights of an FP8 checkpoint, which the model holds dequantized) is not a dtype to
    cast back to: those stay in the model's dtype (the in-memory path writes a dequantized checkpoint)."""
    state = model.state_dict(keep_vars=True)
    changed = stored_dtype_changes(model, disk_dtypes)
    for name in changed:
        t = state[name]
        t.data = t.data.to(disk_dtypes[name])
    return changed


def stored_dtype_changes(model, disk_dtypes: dict[str, torch.dtype]) -> list[str]:
    """The parameters/buffers `match_disk_dtypes` would cast: floating tensors held in another dtype than their
    checkpoint stores (quantized storage excepted)."""
    return [name for name, t in model.state_dict(keep_vars=True).items()
            if (want := disk_dtypes.get(name)) is not None and t.dtype != want and t.is_floating_point()
            and not is_quantized_dtype(want)]


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu", routing: bool = True):
    """`Auto*.from_pretrained(path)` (the stock class for this config) from local files only, in eval mode.

    Loads any moeprune output: non-uniform expert widths (which stock `from_pretrained` refuses by design) go
    through `io.nonuniform.load_nonuniform`. Quantized checkpoints (FP8, MXFP4: `io.quant`) are dequantized;
    compressed-tensors ones are decompressed by transformers, or, when their routed experts use several widths
    (which transformers 5.24 decodes with one), module by module by compressed-tensors (`quant/load.py`).

    An export of a dynamic routing policy (top_p, naee_skip) holds it in config.json under `moeprune_routing`;
    it is applied here (`routing/apply.py`) unless `routing=False` (the model's own routing)."""
    model = runnable(_load_model(path, dtype, device))
    if routing:
        from moeprune.routing.apply import apply_config_routing

        apply_config_routing(model)
    return model


def _routing_marker_ignored(auto, config):
    """A dynamic routing export's marker tensor is not reported as unexpected here: the policy is applied (or, with
    routing=False, deliberately not) by the caller (`routing/marker.py`)."""
    from contextlib import nullcontext

    from moeprune.routing.apply import config_block

    if config_block(config) is None:
        return nullcontext()
    from moeprune.routing.marker import marker_ignored

    return marker_ignored(auto, config)


def _load_model(path: str | Path, dtype: str, device: str):
    from transformers import AutoConfig

    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file() and nonuniform.is_nonuniform(json.loads(cfg_file.read_text())):
        return nonuniform.load_nonuniform(path, dtype).to(device).eval()

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trusted())
    kwargs = {}
    quant = quant_format(json.loads(cfg_file.read_text()), str(cfg_file)) if cfg_file.is_file() else None
    if quant is not None and quant.method == "compressed-tensors":
        from moeprune.quant.load import expert_schemes, load_decompressed

        if len(expert_schemes(quant.config)) > 1:  # transformers would decode every expert with one width
            return load_decompressed(path, parse_dtype(dtype)).to(device).eval()
        # else stock: experts dequantized at load, other modules decompressed by compressed-tensors per module
    elif quant is not None:
        # FP8 / MXFP4: always the dequantized plain model (on a GPU transformers would keep FP8 / MXFP4 modules)
        kwargs["quantization_config"] = quant.hf_dequantize_config()
    if trusted():
        kwargs["trust_remote_code"] = True
    ct = quant is not None and quant.method == "compressed-tensors"
    # compressed-tensors: loaded in the checkpoint's dtype, so every weight is decompressed to (q − z)·s in its
    # scales' dtype (a float32 load would give routed experts that, but dense modules the exact float32 product)
    auto = auto_class(config)
    with _routing_marker_ignored(auto, config):
        model = auto.from_pretrained(str(path), dtype=parse_dtype("auto" if ct else dtype), local_files_only=True,
                                     **kwargs)
    if ct:
        compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
        if compressor is not None and hasattr(model, "ct_decompress_hook"):
            compressor.decompress_model(model)  # what the first forward would do: Ŵ in the scales' dtype
        if parse_dtype(dtype) != "auto":
            model.to(parse_dtype(dtype))  # transformers leaves decompressed weights in their scales' dtype
    return model.to(device).eval()

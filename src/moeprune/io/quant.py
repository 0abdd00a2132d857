"""A checkpoint's quantization: its format (`quantization_config.quant_method` in config.json), whether moeprune
supports it, and whether its scale tensors fit their weights.

Supported formats (`FORMATS`, a registry):
    compressed-tensors   moeprune's own quantized exports (`quant/export.py`) and llm-compressor's pack-quantized
           checkpoints: `PREFIX.weight_packed` int32 with `weight_scale`, `weight_shape` (and `weight_zero_point`);
           stock loading decompresses them (`io/load.py`; mixed routed-expert widths: `quant/load.py`).
    fp8    block-quantized FP8 (DeepSeek-V3/R1, Qwen3-FP8, GLM-4.5-FP8). A quantized Linear weight W [.., out, in]
           is float8_e4m3fn with `weight_scale_inv` S [.., ceil(out/b0), ceil(in/b1)] (b = `weight_block_size`,
           one scale for the whole matrix when absent), float32 (or bf16; uint8/e8m0 for `scale_fmt: ue8m0`):
               W_deq[r, c] = W[r, c] * S[r // b0, c // b1]
           Modules in `modules_to_not_convert` (routers, lm_head, ...) are stored unquantized.
    mxfp4  gpt-oss experts: `<proj>_blocks` uint8 [E, out, in/32, 16] (32 e2m1 values per block, two per byte,
           low nibble first) and `<proj>_scales` uint8 e8m0 [E, out, in/32]:
               W_deq[e, o, 32 g + j] = e2m1(nibble j of block g) * 2 ** (scales[e, o, g] - 127)
           and the in-memory weight is its transpose [E, in, out].

`quant_format(config_dict)` refuses an unknown or unsupported `quant_method` (naming the supported ones);
`QuantFormat.check_headers(entries)` refuses, from the safetensors headers only, a scale tensor that is missing,
has no weight, the wrong shape or the wrong dtype (both run by `Checkpoint.open`, before any work);
`QuantFormat.check_values(entries)` reads the scale tensors only (1/4096 of an FP8 checkpoint's bytes, 1/16 of MXFP4
blocks) and refuses non-finite or non-positive scales (run where weights are read: lazy loading, streaming apply).
Loading dequantizes with transformers' own ops: `hf_dequantize_config()` is the `FineGrainedFP8Config` /
`Mxfp4Config` with `dequantize=True` that `io/lazy.py` hands to transformers' quantizer. `QuantFormat.read` gives
one weight dequantized (tensor by tensor, for data-free criteria); `QuantFormat.params` counts what a stored tensor
holds (scales: none; an MXFP4 byte: two).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from moeprune.errors import MoePruneError
from moeprune.io.quant_config import quantization_dict
from moeprune.io.safetensors_io import DTYPES, OutTensor, TensorEntry, read_tensor
from moeprune.registry import Registry

FP8_WEIGHT = "F8_E4M3"
FP8_SCALE = "weight_scale_inv"
FP8_SCALE_DTYPES = {"float": ("F32", "BF16"), "ue8m0": ("U8", "E8M0", "F8_E8M0")}
SCALE_ENDS = ("_scale_inv", "_scales")  # how scale tensors of the supported formats are named
CT_PACKED = ".weight_packed"  # compressed-tensors pack-quantized: the packed integers of PREFIX.weight
CT_COMPANIONS = (".weight_scale", ".weight_shape", ".weight_zero_point")  # ... and what comes with them
MX_BLOCK = 32  # values per MXFP4 scale
E8M0_NAN = 255  # the e8m0 byte that encodes NaN


@dataclass(frozen=True)
class QuantFormat:
    """One supported `quant_method`: how to validate its tensors and how transformers dequantizes it."""

    method: str
    config: dict  # config.json's quantization_config
    check: Callable[[QuantFormat, dict[str, TensorEntry]], None]  # header checks
    values: Callable[[QuantFormat, dict[str, TensorEntry]], None]  # value checks (reads scale tensors)
    hf_class: str  # transformers' config class, built with dequantize=True
    reader: Callable[[QuantFormat, TensorEntry, dict[str, TensorEntry]], torch.Tensor]  # one weight, dequantized

    def check_headers(self, entries: Sequence[TensorEntry | OutTensor]) -> None:
        """Header checks on tensors (name, dtype, shape): read checkpoint entries, or tensors about to be written."""
        self.check(self, {e.name: e for e in entries})

    def check_values(self, entries: list[TensorEntry]) -> None:
        self.values(self, {e.name: e for e in entries})

    def params(self, entry: TensorEntry) -> int:
        """Model parameters a stored tensor holds: scales hold none, an MXFP4 byte holds two, a packed
        compressed-tensors int32 word 32 / bits."""
        if entry.name.endswith(SCALE_ENDS) or entry.name.endswith(CT_COMPANIONS):
            return 0
        if self.method == "compressed-tensors" and entry.name.endswith(CT_PACKED):
            return entry.numel * 32 // _ct_bits(self, entry.name.removesuffix(CT_PACKED))
        return entry.numel * 2 if self.method == "mxfp4" and entry.name.endswith("_blocks") else entry.numel

    def read(self, entry: TensorEntry, entries: dict[str, TensorEntry]) -> torch.Tensor | None:
        """One checkpoint tensor as the model's values (float32 where it is quantized), None for a scale tensor
        (it belongs to its weight). Reads that tensor and its scale only."""
        if entry.name.endswith(SCALE_ENDS) or entry.name.endswith(CT_COMPANIONS):
            return None
        return self.reader(self, entry, entries)

    def hf_dequantize_config(self):
        """transformers' quantization config for this checkpoint, with `dequantize=True`."""
        import transformers

        cls = getattr(transformers, self.hf_class)
        return cls.from_dict({**self.config, "dequantize": True})


FORMATS: Registry[dict] = Registry("quant_method", "moeprune reads (and dequantizes) only these quantized formats; "
                                   "use a bf16 checkpoint or dequantize the model first.")


def quant_format(config_dict: dict, where: str = "config.json") -> QuantFormat | None:
    """The checkpoint's quantization format, None when unquantized; unknown/unsupported methods are refused."""
    qcfg = quantization_dict(config_dict)
    if qcfg is None:
        return None
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if not isinstance(method, str):
        raise MoePruneError(f"{where}: quantization_config has no quant_method ({qcfg!r}); supported: "
                            f"{', '.join(FORMATS)}.")
    spec = FORMATS.get(method)
    return QuantFormat(method, qcfg, **spec)


# --------------------------------------------------------------------------------------------- fp8


def _fp8_block(fmt: QuantFormat) -> tuple[int, int] | None:
    block = fmt.config.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise MoePruneError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}.")
    return int(block[0]), int(block[1])


def _check_fp8(fmt: QuantFormat, entries: dict[str, TensorEntry]) -> None:
    if fmt.config.get("expert_dtype", "fp8") != "fp8":
        raise MoePruneError(f"FP8 checkpoints with expert_dtype={fmt.config['expert_dtype']!r} (packed FP4 experts) "
                            "are not supported; only expert_dtype 'fp8'.")
    block = _fp8_block(fmt)
    scale_fmt = fmt.config.get("scale_fmt") or "float"
    if scale_fmt not in FP8_SCALE_DTYPES:
        raise MoePruneError(f"quantization_config.scale_fmt {scale_fmt!r} is unknown; supported: "
                            f"{', '.join(FP8_SCALE_DTYPES)}.")
    scale_dtypes = FP8_SCALE_DTYPES[scale_fmt]
    suffix = "." + FP8_SCALE
    scales = [e for n, e in entries.items() if n.endswith(suffix)]
    if not scales:
        raise MoePruneError("config.json says the checkpoint is quantized (quant_method fp8) but no tensor is named "
                            f"'*.{FP8_SCALE}': the config does not match the weights. Remove quantization_config from "
                            "config.json if the weights are not quantized.")
    for s in scales:
        weight = entries.get(s.name[: -len(suffix)] + ".weight")
        if weight is None:
            raise MoePruneError(f"scale tensor {s.name} has no weight {s.name[: -len(suffix)]}.weight: the checkpoint "
                                "is broken.")
        if weight.dtype != FP8_WEIGHT or len(weight.shape) < 2:
            raise MoePruneError(f"{weight.name} has a scale but is {weight.dtype} {list(weight.shape)}, not a float8 "
                                "(F8_E4M3) matrix: the checkpoint is broken.")
        *lead, rows, cols = weight.shape
        want = (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1])) if block else None
        ok = s.shape == want if want else math.prod(s.shape) == 1
        if not ok or s.dtype not in scale_dtypes:
            expected = list(want) if want else "one value"
            raise MoePruneError(f"{s.name} is {s.dtype} {list(s.shape)}; weight {list(weight.shape)} with "
                                f"weight_block_size {list(block) if block else None} needs {' or '.join(scale_dtypes)} "
                                f"{expected}: the scale tensor is corrupted (re-download it).")
    unscaled = [n for n, e in entries.items() if e.dtype == FP8_WEIGHT and n.removesuffix(".weight") + suffix
                not in entries]
    if unscaled:
        raise MoePruneError(f"float8 weights without their {FP8_SCALE}: {unscaled[:3]} ({len(unscaled)} in all): "
                            "the scale tensors are missing (re-download them).")


def _read_by_file(entries: list[TensorEntry]) -> Iterator[list[tuple[TensorEntry, torch.Tensor]]]:
    """Many small tensors (scales), one file's worth at a time, each file opened once."""
    by_file: dict[str, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(str(e.file), []).append(e)
    for file, group in sorted(by_file.items()):
        out = []
        with open(file, "rb") as f:
            for e in sorted(group, key=lambda e: e.begin):
                f.seek(e.begin)
                raw = bytearray(f.read(e.nbytes))
                out.append((e, torch.frombuffer(raw, dtype=DTYPES[e.dtype][1]) if raw else torch.empty(0)))
        yield out


def _refuse_bad(entries: list[TensorEntry], is_bad: Callable[[TensorEntry, torch.Tensor], torch.Tensor],
                what: str) -> None:
    """Check all values of `entries` file by file (one vectorised test per file); name the first bad tensor."""
    for group in _read_by_file(entries):
        flags = torch.cat([is_bad(e, t) for e, t in group])  # [all values of this file's scales]
        if bool(flags.any()):
            e, t = next((e, t) for e, t in group if bool(is_bad(e, t).any()))
            bad = is_bad(e, t)
            raise MoePruneError(f"{e.name} holds {int(bad.sum())} {what} (e.g. {t[bad][:3].tolist()}): the scale "
                                "tensor is corrupted (re-download it).")


def _values_fp8(fmt: QuantFormat, entries: dict[str, TensorEntry]) -> None:
    def is_bad(e: TensorEntry, t: torch.Tensor) -> torch.Tensor:
        if e.dtype == "U8":  # ue8m0 exponent bytes
            return t == E8M0_NAN
        t = t.float()
        return ~(t.isfinite() & (t > 0))

    _refuse_bad([e for n, e in entries.items() if n.endswith("." + FP8_SCALE)], is_bad,
                "non-finite or non-positive scales")


def _read_fp8(fmt: QuantFormat, entry: TensorEntry, entries: dict[str, TensorEntry]) -> torch.Tensor:
    """W * S per block (the format's definition, partial edge blocks included), float32."""
    from moeprune.io.quant_ops import fp8_dequantize_partial

    scale = entries.get(entry.name.removesuffix(".weight") + "." + FP8_SCALE)
    if entry.dtype != FP8_WEIGHT or scale is None:
        return read_tensor(entry)
    block = _fp8_block(fmt) or tuple(entry.shape[-2:])
    return fp8_dequantize_partial(read_tensor(entry), read_tensor(scale), block, torch.float32)


# --------------------------------------------------------------------------------------------- mxfp4


def _check_mxfp4(fmt: QuantFormat, entries: dict[str, TensorEntry]) -> None:
    blocks = {n.removesuffix("_blocks"): e for n, e in entries.items() if n.endswith("_blocks")}
    scales = {n.removesuffix("_scales"): e for n, e in entries.items() if n.endswith("_scales")}
    if not blocks:
        raise MoePruneError("config.json says the checkpoint is quantized (quant_method mxfp4) but no tensor is named "
                            "'*_blocks': the config does not match the weights. Remove quantization_config from "
                            "config.json if the weights are not quantized.")
    for stem in sorted(blocks.keys() ^ scales.keys()):
        have, lack = ("_blocks", "_scales") if stem in blocks else ("_scales", "_blocks")
        raise MoePruneError(f"{stem}{have} has no {stem}{lack}: the checkpoint is broken (re-download it).")
    for stem, b in blocks.items():
        s = scales[stem]
        if b.dtype != "U8" or len(b.shape) < 2 or b.shape[-1] != MX_BLOCK // 2:
            raise MoePruneError(f"{b.name} is {b.dtype} {list(b.shape)}; MXFP4 blocks are U8 [..., in/{MX_BLOCK}, "
                                f"{MX_BLOCK // 2}]: the tensor is corrupted.")
        if s.dtype != "U8" or s.shape != b.shape[:-1]:
            raise MoePruneError(f"{s.name} is {s.dtype} {list(s.shape)}; blocks {list(b.shape)} need U8 scales "
                                f"{list(b.shape[:-1])}: the scale tensor is corrupted (re-download it).")


def _values_mxfp4(fmt: QuantFormat, entries: dict[str, TensorEntry]) -> None:
    scales = [e for n, e in entries.items() if n.endswith("_scales") and n[: -len("_scales")] + "_blocks" in entries]
    _refuse_bad(scales, lambda e, t: t == E8M0_NAN, f"NaN scales (e8m0 byte {E8M0_NAN})")


def _read_mxfp4(fmt: QuantFormat, entry: TensorEntry, entries: dict[str, TensorEntry]) -> torch.Tensor:
    """Blocks [E, out, G, 16] + scales -> the in-memory weight [E, in, out], float32, by transformers' unpacking."""
    if not entry.name.endswith("_blocks"):
        return read_tensor(entry)
    from moeprune.compat import convert_moe_packed_tensors

    scales = entries[entry.name.removesuffix("_blocks") + "_scales"]
    return convert_moe_packed_tensors(read_tensor(entry), read_tensor(scales), dtype=torch.float32)


# --------------------------------------------------------------------------------------------- compressed-tensors


def _ct_bits(fmt: QuantFormat, prefix: str) -> int:
    from moeprune.quant.load import scheme_of

    return scheme_of(prefix, fmt.config).weights.num_bits


def _check_ct(fmt: QuantFormat, entries: dict[str, TensorEntry]) -> None:
    for name in entries:
        if name.endswith(CT_PACKED):
            prefix = name.removesuffix(CT_PACKED)
            lacking = [s for s in CT_COMPANIONS[:2] if prefix + s not in entries]
            if lacking:
                raise MoePruneError(f"{name} has no {prefix}{lacking[0]}: the checkpoint is broken (re-download it).")


def _values_ct(fmt: QuantFormat, entries: dict[str, TensorEntry]) -> None:
    scales = [e for n, e in entries.items() if n.endswith(".weight_scale") and n.removesuffix(".weight_scale")
              + CT_PACKED in entries]
    _refuse_bad(scales, lambda e, t: ~(t.float().isfinite() & (t.float() > 0)), "non-finite or non-positive scales")


def _read_ct(fmt: QuantFormat, entry: TensorEntry, entries: dict[str, TensorEntry]) -> torch.Tensor:
    """A packed weight decompressed by its config group (compressed-tensors' compressor), float32."""
    if not entry.name.endswith(CT_PACKED):
        return read_tensor(entry)
    from moeprune.quant.load import decompress_module

    prefix = entry.name.removesuffix(CT_PACKED)
    state = {n.rpartition(".")[2]: read_tensor(entries[n]) for n in (prefix + s for s in (CT_PACKED, *CT_COMPANIONS))
             if n in entries}
    return decompress_module(prefix, state, fmt.config).float()


FORMATS.register("compressed-tensors", dict(check=_check_ct, values=_values_ct, hf_class="CompressedTensorsConfig",
                                            reader=_read_ct))
FORMATS.register("fp8", dict(check=_check_fp8, values=_values_fp8, hf_class="FineGrainedFP8Config", reader=_read_fp8))
FORMATS.register("mxfp4", dict(check=_check_mxfp4, values=_values_mxfp4, hf_class="Mxfp4Config",
                               reader=_read_mxfp4))


def is_quantized_dtype(dtype: torch.dtype) -> bool:
    """A storage dtype no computation runs in (float8 variants): 'auto' must not resolve to it."""
    return dtype.is_floating_point and dtype.itemsize == 1

"""`moeprune export gguf EXPORT --out model.gguf`: a stock-loadable checkpoint -> one GGUF file for llama.cpp.

    checks (before any work) ─► llama.cpp's converter in a child process ─► temp file next to --out
      ─► structural check (`gguf/check.py`) ─► [--verify: llama.cpp logits vs transformers] ─► rename into place

Refused up front, each with the reason: a family llama.cpp's converter has no class for; a non-uniform moeprune
export (per-layer expert widths: GGUF holds one expert count and width per model); a quantized checkpoint
(compressed-tensors / FP8 / MXFP4: convert the unquantized export and let llama.cpp quantize, e.g. --outtype
q8_0); a folder without a tokenizer; an --out that exists (without --overwrite) or is not a .gguf file.

`--outtype auto` keeps the checkpoint's stored float type (f32 -> f32, bf16 -> bf16, f16 -> f16): lossless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.gguf.check import Expected, GgufSummary, check_gguf
from moeprune.gguf.converter import Converter, find_converter
from moeprune.gguf.families import GGUF_FAMILIES, working_families
from moeprune.io.atomic import check_output_file
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.nonuniform_config import is_nonuniform
from moeprune.io.report import read_report
from moeprune.log import logger

OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
STORED = {"F32": "f32", "BF16": "bf16", "F16": "f16"}  # safetensors dtype -> the lossless outtype
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class GgufOptions:
    outtype: str = "auto"
    overwrite: bool = False
    verify: bool = False  # llama.cpp logits against transformers after writing (needs llama-cpp-python)

    def __post_init__(self) -> None:
        if self.outtype not in OUTTYPES:
            raise MoePruneError(f"--outtype {self.outtype!r}: choose one of {', '.join(OUTTYPES)}.")


def refusal(ckpt: Checkpoint) -> str | None:
    """Why this checkpoint cannot become a GGUF, from its own files (None: it can, as far as they tell)."""
    cfg = ckpt.config_dict
    if is_nonuniform(cfg):
        return ("it is a non-uniform moeprune export (expert widths differ between layers); GGUF and llama.cpp hold "
                "one expert width per model. Export with a uniform ratio (or --method without per-layer widths).")
    if cfg.get("moeprune_routing"):
        method = cfg["moeprune_routing"].get("method", "dynamic")
        return (f"it carries a dynamic routing policy ({method}, config.json moeprune_routing), and llama.cpp routes "
                "one top-k per layer, so the GGUF would route differently from the export without saying so. "
                "Convert the export the policy was applied to (without the routing stage), or a static topk export.")
    report = read_report(ckpt.path) or {}
    if report.get("loadable_by_stock_config") is False:
        return ("its moeprune report says stock transformers cannot load it as it is (mixed widths); llama.cpp's "
                "converter reads it the same way. Export a uniform variant.")
    if cfg.get("quantization_config") or ckpt.quantization is not None:
        method = (cfg.get("quantization_config") or {}).get("quant_method", "quantized")
        return (f"it is quantized ({method}); llama.cpp's converter expects float weights. Convert the unquantized "
                "export and quantize in llama.cpp (--outtype q8_0 here, or llama-quantize).")
    if not cfg.get("architectures"):
        return "its config.json names no `architectures`, which llama.cpp's converter dispatches on."
    family = GGUF_FAMILIES.get(cfg.get("model_type", ""))
    if family is not None and (why := family.refusal(cfg)):
        return why + "."
    if not any((ckpt.path / f).is_file() for f in TOKENIZER_FILES):
        return ("the folder has no tokenizer (tokenizer.json or tokenizer.model); a GGUF carries its vocabulary. "
                "Copy the original model's tokenizer files into it.")
    return None


def converter_refusal(ckpt: Checkpoint, converter: Converter) -> str | None:
    """Why llama.cpp's converter cannot take this architecture (None: it has a model class for it)."""
    arch = ckpt.config_dict["architectures"][0]
    if arch in converter.architectures():
        return None
    return (f"llama.cpp's converter ({converter.describe()}) has no model class for {arch} (model_type "
            f"{ckpt.config_dict.get('model_type')!r}); families that work in llama.cpp as measured: "
            f"{', '.join(working_families())}.")


def expected(ckpt: Checkpoint) -> Expected:
    """What the GGUF must hold, from the checkpoint's config through moeprune's adapter."""
    from moeprune.models import get_adapter

    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    text = ckpt.config.get_text_config() if hasattr(ckpt.config, "get_text_config") else ckpt.config
    family = GGUF_FAMILIES.get(adapter.model_type)
    return Expected(family.arch if family else None, adapter.num_layers, adapter.num_experts, adapter.top_k,
                    int(text.hidden_size), int(adapter.expert_width), tuple(adapter.moe_layers()))


def resolve_outtype(ckpt: Checkpoint, outtype: str) -> str:
    """`auto` -> the float type holding most of the checkpoint's bytes (f32 when that is not a float type)."""
    if outtype != "auto":
        return outtype
    by_type: dict[str, int] = {}
    for e in ckpt.entries:
        by_type[e.dtype] = by_type.get(e.dtype, 0) + e.nbytes
    return STORED.get(max(by_type, key=by_type.__getitem__), "f32") if by_type else "f32"


def export_gguf(model: str | Path, out: str | Path, opts: GgufOptions = GgufOptions()) -> GgufSummary:
    ckpt = Checkpoint.open(model)
    out_path = check_output_file(out, ".gguf", opts.overwrite, inputs=(ckpt.path,))
    if opts.verify:
        from moeprune.gguf.llama import import_llama_cpp

        import_llama_cpp()  # refused now, not after the conversion
    why = refusal(ckpt)  # from the folder alone: before the converter is fetched
    converter = find_converter() if why is None else None
    why = why or converter_refusal(ckpt, converter)
    if why:
        raise MoePruneError(f"cannot convert {ckpt.path} to GGUF: {why}")
    want = expected(ckpt)
    if want.arch is None:
        logger.warning("model_type %r: llama.cpp's converter knows %s, but moeprune has not measured this family "
                       "in llama.cpp; the structural check still runs (add --verify to compare logits)",
                       ckpt.config_dict.get("model_type"), ckpt.config_dict["architectures"][0])
    family = GGUF_FAMILIES.get(ckpt.config_dict.get("model_type", ""))
    if family is not None and (note := family.caution(ckpt.config_dict)):
        logger.warning("llama.cpp will not compute exactly what transformers computes: %s", note)
    outtype = resolve_outtype(ckpt, opts.outtype)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".partial.gguf", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        run_converter(converter, ckpt.path, tmp, outtype, family.hparams if family else {})
        summary = check_gguf(tmp, want, outtype)
        if opts.verify:
            from moeprune.gguf.llama import verify_gguf

            check = verify_gguf(ckpt.path, tmp, outtype)
            logger.info("%s", check.line())
            if not check.passed:
                raise MoePruneError(f"llama.cpp's logits disagree with transformers: {check.line()}; nothing was "
                                    "written.")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    summary = GgufSummary(**{**summary.to_dict(), "path": str(out_path)})
    logger.info("GGUF written: %s", summary.line())
    return summary


def run_converter(converter: Converter, src: Path, dst: Path, outtype: str, hparams: dict | None = None) -> None:
    """llama.cpp's convert_hf_to_gguf.py on `src` -> `dst` in a child process (see `gguf/_convert.py`)."""
    script = Path(__file__).with_name("_convert.py")
    cmd = [sys.executable, str(script), str(converter.root), str(src), "--outfile", str(dst), "--outtype", outtype]
    logger.info("converting %s with %s (--outtype %s)", src, converter.describe(), outtype)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": "1",  # _convert.py puts its gguf-py first
           "MOEPRUNE_GGUF_HPARAMS": json.dumps(hparams or {})}
    # the converter logs a line per tensor and a tqdm bar while writing: passed through on a terminal (a big model
    # takes a while), kept (last 8 KB) for the error message otherwise
    show = sys.stderr.isatty()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    kept = b""
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):
        if show:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        kept = (kept + chunk)[-8192:]
    rc = proc.wait()
    if rc != 0:
        tail = "\n".join(kept.decode(errors="replace").strip().splitlines()[-12:])
        raise MoePruneError(f"llama.cpp's converter failed on {src} (exit {rc}); its last lines:\n{tail}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

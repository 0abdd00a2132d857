"""A compressed-tensors checkpoint decompressed module by module, each with the config group that targets it.

transformers 5.24 decompresses all routed experts of a checkpoint with ONE config group
(`integrations/compressed_tensors.py:get_experts_scheme`: the first group whose `re:` targets mention "experts";
the expert converters are built with `CompressedTensorsDequantize(hf_quantizer)`, scheme None). A checkpoint whose
routed experts use several bit widths (per layer, or per expert) therefore loads with wrong expert weights there,
silently. `decompressed_state` reads such a checkpoint the way the format defines it instead (every module's
group found by compressed-tensors' own `match_name`, unpacked by its compressor), and `load_decompressed` loads that
as a plain model (`io/load.py` uses it for checkpoints with mixed expert widths).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoePruneError

COMPANIONS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def expert_schemes(qconfig: dict) -> set[tuple]:
    """The distinct weight schemes of the groups that target routed experts (`re:` targets naming "experts")."""
    out = set()
    for group in (qconfig.get("config_groups") or {}).values():
        if any(t.startswith("re:") and "experts" in t for t in group.get("targets", [])):
            w = group.get("weights") or {}
            out.add((w.get("num_bits"), w.get("group_size"), w.get("symmetric"), w.get("strategy")))
    return out


MIXED_LAZY = ("its routed experts are stored at several widths ({widths}), and layer-by-layer loading (--lazy) "
              "dequantizes through transformers' compressed-tensors quantizer, whose expert decoder "
              "(get_experts_scheme) takes ONE config group for every expert: the experts of other widths would be "
              "decoded wrong. Load it whole (without --lazy: moeprune decompresses it module by module), or export "
              "one width for all experts.")


def refuse_mixed_lazy(config_dict: dict, where: str = "the checkpoint") -> None:
    """A compressed-tensors checkpoint whose routed experts use several widths cannot be read layer by layer."""
    from moeprune.io.quant_config import quantization_dict

    qcfg = quantization_dict(config_dict)
    if qcfg is None or qcfg.get("quant_method") != "compressed-tensors":
        return
    schemes = expert_schemes(qcfg)
    if len(schemes) > 1:
        widths = "/".join(str(b) for b in sorted({s[0] for s in schemes if s[0] is not None}))
        raise MoePruneError(f"{where}: " + MIXED_LAZY.format(widths=f"{widths} bits"))


def _group_of(name: str, groups: dict):
    from compressed_tensors.utils.match import match_name

    hits = [g for g in groups.values() if any(match_name(name, t) for t in g.targets)]
    if not hits:
        raise MoePruneError(f"{name} is stored quantized but no config group of quantization_config targets it.")
    return hits[0]


def scheme_of(name: str, qconfig: dict):
    """The compressed-tensors `QuantizationScheme` of the first config group that targets module `name`."""
    from compressed_tensors.quantization import QuantizationConfig

    groups = QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k != "quant_method"}
                                               ).config_groups
    return _group_of(name, groups)


def decompress_module(name: str, state: dict[str, torch.Tensor], qconfig: dict) -> torch.Tensor:
    """The weight of module `name` from its compressed tensors `state` (local names), by its own group."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = scheme_of(name, qconfig)
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qconfig.get("format"))
    return compressor.decompress(dict(state), scheme)["weight"]


def decompressed_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor of the checkpoint with quantized modules decompressed to `.weight`, config.json without
    quantization_config)."""
    config = json.loads((folder / "config.json").read_text())
    qconfig = config.pop("quantization_config")
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(str(file)).items():
            prefix, _, local = name.rpartition(".")
            if local in COMPANIONS:
                modules.setdefault(prefix, {})[local] = t
            else:
                out[name] = t
    for prefix, state in modules.items():
        out[f"{prefix}.weight"] = decompress_module(prefix, state, qconfig)
    return out, config


def load_decompressed(folder: str | Path, dtype: torch.dtype | None):
    """Stock from_pretrained of the decompressed checkpoint (written to a temporary folder, removed after)."""
    from transformers import AutoConfig

    from moeprune.io.stock import auto_class

    folder = Path(folder)
    state, config = decompressed_state(folder)
    with tempfile.TemporaryDirectory(prefix=".moeprune-decompressed-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file(state, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        cfg = AutoConfig.from_pretrained(tmp, local_files_only=True)
        return auto_class(cfg).from_pretrained(tmp, dtype=dtype, local_files_only=True)

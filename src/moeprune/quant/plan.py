"""`QuantPlan`: the integer weights and scales of every quantized matrix — JSON + tensors.

    N-quantize.json                 {"format": "moeprune.quant/1", "method": "quantize", "algorithm": "rtn"|"gptq",
                                     "scheme": {...}, "num_experts": E, "layer_bits": {ℓ: b}, "expert_bits":
                                     {ℓ: {i: b}} (only where experts of a layer differ), "fallbacks": {ℓ: [i]},
                                     "summary": {...}, "tensors": "...", "tensors_sha256": "..."}
    N-quantize.tensors.safetensors  "{target key}.q" int8 [out, in], ".scale" [out, in/g] (the model's dtype),
                                    ".zero" int8 [out, in/g] (asymmetric only); target keys as `targets.py` names them
Ŵ = (q − z)·s (`rtn.dequantize`) is what the export holds, so applying the plan writes Ŵ and the export packs (q, s, z)
with compressed-tensors' compressor (`export.py`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoePruneError
from moeprune.io.safetensors_io import tensor_bytes
from moeprune.models.base import MoEAdapter
from moeprune.quant.gptq import Quantized
from moeprune.quant.scheme import QuantScheme, check_bits
from moeprune.select.plan import read_plan_json, write_plan_json

QUANT_FORMAT = "moeprune.quant/1"


@dataclass
class QuantPlan:
    scheme: QuantScheme
    algorithm: str
    num_experts: int
    tensors: dict[str, Quantized] = field(default_factory=dict)  # target key -> (q, scale, zero)
    bits: dict[str, int] = field(default_factory=dict)  # target key -> bits
    parts: dict[str, str] = field(default_factory=dict)  # target key -> part
    fallbacks: dict[int, list[int]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    model_type: str | None = None
    method: str = "quantize"
    ratio: float = 0.0  # nothing is removed

    # ------------------------------------------------------------------ derived
    @property
    def layers(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.tensors})

    def expert_bits(self) -> dict[int, dict[int, int]]:
        """MoE layer -> expert -> bits of its routed projections."""
        out: dict[int, dict[int, int]] = {}
        for key, b in self.bits.items():
            p = key.split(".")
            if p[2] == "expert":
                out.setdefault(int(p[1]), {})[int(p[3])] = b
        return out

    def layer_bits(self) -> dict[int, int | None]:
        """MoE layer -> the one width of its routed experts (None: its experts differ)."""
        return {layer: (next(iter(set(e.values()))) if len(set(e.values())) == 1 else None)
                for layer, e in sorted(self.expert_bits().items())}

    def flat(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, r in self.tensors.items():
            out[f"{key}.q"] = r.q.contiguous().cpu()
            out[f"{key}.scale"] = r.scale.contiguous().cpu()
            if r.zero is not None:
                out[f"{key}.zero"] = r.zero.contiguous().cpu()
        return out

    def tensors_sha256(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.flat().items()):
            h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
            h.update(tensor_bytes(t))
        return h.hexdigest()

    def sha256(self) -> str:
        meta = {k: v for k, v in self.to_dict().items() if k != "tensors"}
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()

    def validate(self, adapter: MoEAdapter) -> None:
        if self.num_experts != adapter.num_experts:
            raise MoePruneError(f"quantization plan was made for {self.num_experts} experts per layer; this model has "
                                f"{adapter.num_experts} — apply the plans in recipe order.")
        for key, b in self.bits.items():
            check_bits(b)
            if key not in self.tensors:
                raise MoePruneError(f"quantization plan: {key} has bits but no tensors.")

    # ------------------------------------------------------------------ files
    def to_dict(self, tensors_file: str | None = None) -> dict:
        expert = self.expert_bits()
        layer = self.layer_bits()
        mixed = {str(k): {str(i): b for i, b in sorted(v.items())} for k, v in sorted(expert.items())
                 if layer[k] is None}
        return {"format": QUANT_FORMAT, "method": self.method, "algorithm": self.algorithm,
                "scheme": self.scheme.to_dict(), "model_type": self.model_type, "num_experts": self.num_experts,
                "layer_bits": {str(k): v for k, v in layer.items()}, "expert_bits": mixed,
                "bits": dict(sorted(self.bits.items())), "parts": dict(sorted(self.parts.items())),
                "fallbacks": {str(k): v for k, v in sorted(self.fallbacks.items())}, "summary": self.summary,
                "tensors": tensors_file, "tensors_sha256": self.tensors_sha256()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = path.with_name(path.name.removesuffix(".json") + ".tensors.safetensors")
        tmp = tensors.with_name(tensors.name + ".tmp")
        save_file(self.flat(), str(tmp), metadata={"format": QUANT_FORMAT})
        tmp.replace(tensors)
        return write_plan_json(path, self.to_dict(tensors.name))

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> QuantPlan:
        name = raw.get("tensors")
        file = Path(source).parent / str(name)
        if not isinstance(name, str) or not file.is_file():
            raise MoePruneError(f"{source}: its tensors file {name!r} is missing; copy the whole moeprune_plans "
                                "folder.")
        plan = cls(QuantScheme.from_dict(raw["scheme"]), str(raw["algorithm"]), int(raw["num_experts"]),
                   bits={k: int(v) for k, v in raw["bits"].items()}, parts=dict(raw["parts"]),
                   fallbacks={int(k): list(v) for k, v in raw.get("fallbacks", {}).items()},
                   summary=raw.get("summary") or {}, model_type=raw.get("model_type"))
        flat = load_file(str(file))
        for key in plan.bits:
            plan.tensors[key] = Quantized(flat[f"{key}.q"], flat[f"{key}.scale"], flat.get(f"{key}.zero"))
        if raw.get("tensors_sha256") != plan.tensors_sha256():
            raise MoePruneError(f"{file}: its tensors do not match the sha256 recorded in {source} (changed or "
                                "corrupt).")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        return cls.from_dict(read_plan_json(path, "quantization plan"), str(path))

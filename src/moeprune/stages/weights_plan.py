"""`WeightsPlan`: new values for routed-expert and router tensors (repair, distill, wanda, compress): JSON + tensors.

    N-KIND.json                 {"format": "moeprune.repair/1", "method": "repair", "settings": {...},
                                 "num_experts": E', "width": I', "layers": [...], "summary": {...},
                                 "tensors": "N-KIND.tensors.safetensors", "tensors_sha256": "..."}
    N-KIND.tensors.safetensors  "layer.{ℓ}.expert.{i}.{role}"   expert i's tensor by canonical role (gate/up [I', H],
                                                                down [H, I'], gate_bias/up_bias [I'], down_bias [H])
                                "layer.{ℓ}.router.{name}"       a router tensor as `adapter.router_tensors` names
                                                                it, experts on dim 0: [E' (+ Z), ...]

A plan of keep masks (`masks`, wanda) is format `moeprune.M/2` with "content": "masks": each expert tensor is the
keep mask of that matrix packed as bits (`sparsity/keep_bits.py`: uint8 [out, ⌈in/8⌉]), applied as W ← W ⊙ keep.
Experts are numbered as in the model the plan is applied to (after every earlier stage). A weights plan changes no
shape and no config key: it replaces values. `experts` is a dict, or for a plan made layer by layer (`--lazy`) or read
from its file a `LayerTensors` (stages/weights_store.py) that keeps the tensors on disk and reads one layer at a time:
hashing, saving (byte copies) and validating never hold more than one layer. Its tensors are the values the stage
computed (`repair`: closed-form least squares; `distill`: trained; `wanda`: masked), so replaying it (`moeprune
apply`) needs no calibration data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeprune.errors import MoePruneError
from moeprune.io.safetensors_io import OutTensor, TensorEntry, read_header, read_tensor, tensor_bytes, write_file
from moeprune.models.base import MoEAdapter
from moeprune.select.plan import read_plan_json, write_plan_json
from moeprune.stages.weights_store import ExpertTensors, FileLayers, LayerTensors, SpilledLayers, expert_index


def _entries_or_tensors(experts: Mapping, layer: int) -> dict:
    """{(expert, role): TensorEntry} of a store's layer (no tensor read), or {(expert, role): tensor} of a dict."""
    if isinstance(experts, LayerTensors):
        return experts.entries(layer)
    return {(i, role): t for i, roles in experts[layer].items() for role, t in roles.items()}


def weights_format(method: str, masks: bool = False) -> str:
    """The JSON format of a weights plan made by `method` ("repair" -> "moeprune.repair/1"): one per stage kind;
    version 2 when its expert tensors are packed keep masks (`masks`), not values."""
    return f"moeprune.{method}/{2 if masks else 1}"

ROLES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


@dataclass
class WeightsPlan:
    method: str  # the stage's method: "repair", "distill", "wanda" or "compress"
    num_experts: int  # E' of the model the plan applies to
    width: int | None  # I' of that model
    experts: Mapping[int, ExpertTensors] = field(default_factory=dict)  # MoE layer -> expert -> role -> tensor
    router: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # MoE layer -> name -> [E' (+Z), ...]
    settings: dict = field(default_factory=dict)  # the stage's options, for the report
    summary: dict = field(default_factory=dict)  # what the stage measured (per layer errors, losses, ...)
    model_type: str | None = None
    ratio: float = 0.0  # nothing is removed; kept so every plan answers `.ratio`
    masks: bool = False  # expert tensors are keep masks packed as bits (`sparsity/keep_bits.py`): W ← W ⊙ keep
    _digest: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (key, sha256, pinned)

    # ------------------------------------------------------------------ derived
    @property
    def layers(self) -> list[int]:
        return sorted(set(self.experts) | set(self.router))

    def flat(self) -> dict[str, torch.Tensor]:
        """Every tensor by its file name, in memory (small plans; `named` reads one layer at a time)."""
        return dict(self.named())

    def named(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in sorted name order, one MoE layer read at a time. Each layer's names share the prefix
        "layer.{ℓ}." and so are contiguous in that order; the layers come in the order of their prefixes."""
        for layer in sorted(self.layers, key=lambda n: f"layer.{n}."):
            named = {f"layer.{layer}.router.{name}": t for name, t in self.router.get(layer, {}).items()}
            for i, roles in self.experts.get(layer, {}).items():
                named.update({f"layer.{layer}.expert.{i}.{role}": t for role, t in roles.items()})
            for name in sorted(named):
                yield name, named[name].detach().contiguous().cpu()

    def tensors_sha256(self) -> str:
        """sha256 over (name, dtype, shape, bytes) of every tensor in `named` order. Remembered while the tensors
        stay the same objects (`_fingerprint`): saving a plan, its provenance and its report each ask for it, and
        hashing a plan that holds every expert of a large model means reading all of it (wanda, compress)."""
        key, pinned = self._fingerprint()
        if self._digest is not None and self._digest[0] == key:
            return self._digest[1]
        h = hashlib.sha256()
        for name, t in self.named():
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(tensor_bytes(t))
        self._digest = (key, h.hexdigest(), pinned)
        return self._digest[1]

    def _fingerprint(self) -> tuple[tuple, list]:
        """(key, pinned): what the tensors are, without reading them. A store's tensor: its byte range and its file's
        size and mtime; an in-memory tensor: its id and in-place version counter, the tensor itself pinned beside
        the remembered digest so that its id cannot be reused meanwhile."""
        pinned: list = []

        def of(t) -> tuple:
            if isinstance(t, TensorEntry):
                st = os.stat(t.file)
                return (str(t.file), t.begin, t.end, t.dtype, tuple(t.shape), st.st_size, st.st_mtime_ns)
            pinned.append(t)
            try:
                return (id(t), t._version)
            except RuntimeError:  # an inference-mode tensor keeps no version counter: never taken as unchanged
                return (id(t), object())

        experts = tuple((layer, key, of(e)) for layer in sorted(self.experts)
                        for key, e in sorted(_entries_or_tensors(self.experts, layer).items(), key=lambda kv: kv[0]))
        router = tuple((layer, name, of(t)) for layer in sorted(self.router)
                       for name, t in sorted(self.router[layer].items(), key=lambda kv: kv[0]))
        return (experts, router), pinned

    def sha256(self) -> str:
        meta = {k: v for k, v in self.to_dict().items() if k != "tensors"}
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()

    def validate(self, adapter: MoEAdapter) -> None:
        """Counts, layers, roles and shapes against the model the plan is applied to (config level)."""
        if self.num_experts != adapter.num_experts:
            raise MoePruneError(f"weights plan ({self.method}) was made for {self.num_experts} experts per layer; "
                                f"this model has {adapter.num_experts} — apply the plans in recipe order.")
        if self.width is not None and adapter.expert_width is not None and self.width != adapter.expert_width:
            raise MoePruneError(f"weights plan ({self.method}) was made for expert width {self.width}; this model "
                                f"has {adapter.expert_width}.")
        moe = set(adapter.moe_layers())
        bad = [layer for layer in self.layers if layer not in moe]
        if bad:
            raise MoePruneError(f"weights plan ({self.method}) names layers {bad}, which are not MoE layers "
                                f"({sorted(moe)}).")
        for layer in self.experts:
            for i, roles in expert_index(self.experts, layer).items():
                if not 0 <= i < self.num_experts:
                    raise MoePruneError(f"weights plan: layer {layer} expert {i} is outside 0..{self.num_experts - 1}.")
                known = ROLES[:3] if self.masks else ROLES  # keep masks: the weight matrices only
                unknown = [r for r in roles if r not in known]
                if unknown:
                    raise MoePruneError(f"weights plan: layer {layer} expert {i} has unknown roles {unknown} "
                                        f"(known: {', '.join(known)}).")
        if self.masks and self.router:
            raise MoePruneError(f"weights plan ({self.method}): a plan of keep masks changes no router tensor.")
        for layer, tensors in self.router.items():
            for name, t in tensors.items():
                if t.shape[0] < self.num_experts:
                    raise MoePruneError(f"weights plan: router tensor {name!r} of layer {layer} has {t.shape[0]} rows"
                                        f" for {self.num_experts} experts.")

    # ------------------------------------------------------------------ files
    def to_dict(self, tensors_file: str | None = None) -> dict:
        return {"format": weights_format(self.method, self.masks), "method": self.method,
                "model_type": self.model_type, "num_experts": self.num_experts, "width": self.width,
                "layers": self.layers, **({"content": "masks"} if self.masks else {}), "settings": self.settings,
                "summary": self.summary, "tensors": tensors_file, "tensors_sha256": self.tensors_sha256()}

    def save(self, path: str | Path) -> Path:
        """The JSON at `path` and the tensors next to it (`NAME.tensors.safetensors`), each written atomically. The
        tensors file is written by copying byte ranges (layers held in memory are first written to a temporary
        folder next to it, one layer at a time)."""
        path = Path(path)
        tensors = path.with_name(path.name.removesuffix(".json") + ".tensors.safetensors")
        tmp = tensors.with_name(tensors.name + ".tmp")
        with tempfile.TemporaryDirectory(prefix=".weights-", dir=path.parent) as scratch:
            store = self.experts
            if not isinstance(store, LayerTensors):
                store = SpilledLayers(scratch)
                for layer, experts in self.experts.items():
                    store[layer] = experts
            sources = self._sources(store, Path(scratch))
            write_file(tmp, [OutTensor(name, e.dtype, e.shape, e.file, ((e.begin, e.end),))
                             for name, e in sorted(sources.items())], metadata={"format": weights_format(self.method)})
        tmp.replace(tensors)
        if isinstance(self.experts, FileLayers) and self.experts.file == tensors.resolve():  # saved over its source
            self.experts = FileLayers.open(tensors)[0]  # the byte ranges of the file now there
        return write_plan_json(path, self.to_dict(tensors.name))

    def _sources(self, store: LayerTensors, scratch: Path) -> dict[str, TensorEntry]:
        """Every tensor's name in the plan file -> where its bytes are (the experts in `store`, the router written
        to `scratch`)."""
        out = {f"layer.{layer}.expert.{i}.{role}": e for layer in store
               for (i, role), e in store.entries(layer).items()}
        router = {f"layer.{layer}.router.{name}": t.detach().contiguous().cpu() for layer, names in self.router.items()
                  for name, t in names.items()}
        if router:
            save_file(router, str(scratch / "router.safetensors"))
            out.update({e.name: e for e in read_header(scratch / "router.safetensors")[0]})
        return out

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> WeightsPlan:
        """The plan a JSON names; its expert tensors stay in the tensors file (`FileLayers`), read per layer."""
        name = raw.get("tensors")
        if not isinstance(name, str):
            raise MoePruneError(f"{source}: a weights plan names its tensors file ('tensors').")
        file = Path(source).parent / name
        if not file.is_file():
            raise MoePruneError(f"{source}: its tensors file {file} is missing; copy the whole moeprune_plans folder.")
        content = raw.get("content", "values")
        if content not in ("values", "masks") or raw.get("format") != weights_format(str(raw.get("method")),
                                                                                     content == "masks"):
            raise MoePruneError(f"{source}: format {raw.get('format')!r} with content {content!r}: a weights plan "
                                "of method M holds values (moeprune.M/1) or packed keep masks (moeprune.M/2, "
                                "content 'masks').")
        experts, router = FileLayers.open(file)
        plan = cls(str(raw.get("method")), int(raw["num_experts"]), raw.get("width"), experts, settings=raw.get(
                   "settings") or {}, summary=raw.get("summary") or {}, model_type=raw.get("model_type"),
                   masks=content == "masks")
        for entry in router:
            parts = entry.name.split(".")
            plan.router.setdefault(int(parts[1]), {})[".".join(parts[3:])] = read_tensor(entry)
        if raw.get("tensors_sha256") not in (None, plan.tensors_sha256()):
            raise MoePruneError(f"{file}: its tensors do not match the sha256 recorded in {source} (changed or "
                                "corrupt).")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> WeightsPlan:
        return cls.from_dict(read_plan_json(path, "weights plan"), str(path))

"""Read a written GGUF back (the `gguf` package's reader) and check it against the checkpoint it came from.

What must hold, with E routed experts, k used per token, H hidden size, I expert width, and ggml's dimension
order (fastest first, the reverse of torch's):

    general.architecture            = the family's llama.cpp name (when moeprune knows it)
    {arch}.block_count              = decoder layers (+ {arch}.nextn_predict_layers, GLM's MTP blocks)
    {arch}.expert_count             = E              {arch}.expert_used_count = k
    blk.L.ffn_gate_inp.weight       : (H, E)         for every MoE layer L, and on no other layer
    blk.L.ffn_{gate,up}_exps.weight : (H, I, E)      (or ffn_gate_up_exps: (H, 2I, E))
    blk.L.ffn_down_exps.weight      : (I, H, E)

Any mismatch raises a MoePruneError naming the key or tensor; `GgufSummary` is what the export reports.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from moeprune.errors import MoePruneError

EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight$")
ROUTER_TENSOR = re.compile(r"blk\.(\d+)\.ffn_gate_inp\.weight$")


@dataclass(frozen=True)
class Expected:
    arch: str | None  # None: a family moeprune has not measured (the file's own name is taken)
    layers: int
    experts: int
    top_k: int
    hidden: int
    width: int
    moe_layers: tuple[int, ...]


@dataclass(frozen=True)
class GgufSummary:
    path: str
    arch: str
    outtype: str
    layers: int
    experts: int
    top_k: int
    moe_layers: int
    tensors: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"{self.path}: {self.arch}, {self.layers} layers ({self.moe_layers} MoE), {self.experts} experts, "
                f"top-{self.top_k}, {self.tensors} tensors, {self.bytes / 1e6:.1f} MB ({self.outtype})")


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise MoePruneError(f"reading GGUF needs the `gguf` package ({e}); install it with: "
                            "pip install 'moeprune[gguf]'") from e
    return GGUFReader(str(path))


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        raise MoePruneError(f"the GGUF has no {key!r} entry; llama.cpp could not run it as a MoE model.")
    return f.contents()


def check_gguf(path: Path, want: Expected, outtype: str) -> GgufSummary:
    """Structural check of the file at `path` (see the module docstring)."""
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if want.arch is not None and arch != want.arch:
        raise MoePruneError(f"the GGUF's general.architecture is {arch!r}, expected {want.arch!r}.")
    nextn = reader.fields.get(f"{arch}.nextn_predict_layers")  # multi-token-prediction blocks after the decoder
    layers = want.layers + (int(nextn.contents()) if nextn is not None else 0)
    for key, expected in ((f"{arch}.block_count", layers), (f"{arch}.expert_count", want.experts),
                          (f"{arch}.expert_used_count", want.top_k)):
        got = int(_field(reader, key))
        if got != expected:
            raise MoePruneError(f"the GGUF's {key} is {got}, the checkpoint has {expected}.")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    H, I, E = want.hidden, want.width, want.experts
    expect = {"gate": (H, I, E), "up": (H, I, E), "down": (I, H, E), "gate_up": (H, 2 * I, E)}
    layers_seen: dict[int, set[str]] = {}
    for name, shape in shapes.items():
        m = EXPERT_TENSOR.match(name)
        if m:
            layer, part = int(m.group(1)), m.group(2)
            if shape != expect[part]:
                raise MoePruneError(f"GGUF tensor {name} has shape {shape} (ggml order), expected {expect[part]} "
                                    f"for {E} experts of width {I} on hidden size {H}.")
            layers_seen.setdefault(layer, set()).add(part)
        m = ROUTER_TENSOR.match(name)
        if m and shape != (H, E):
            raise MoePruneError(f"GGUF router {name} has shape {shape}, expected {(H, E)}.")
    if sorted(layers_seen) != sorted(want.moe_layers):
        raise MoePruneError(f"the GGUF has expert tensors on layers {sorted(layers_seen)}, the checkpoint's MoE "
                            f"layers are {sorted(want.moe_layers)}.")
    for layer, parts in layers_seen.items():
        if parts not in ({"gate", "up", "down"}, {"gate_up", "down"}):
            raise MoePruneError(f"GGUF layer {layer} holds expert tensors {sorted(parts)}; expected gate, up and "
                                "down (or gate_up and down).")
    for layer in want.moe_layers:
        if f"blk.{layer}.ffn_gate_inp.weight" not in shapes:
            raise MoePruneError(f"GGUF layer {layer} has experts but no router (blk.{layer}.ffn_gate_inp.weight).")
    return GgufSummary(str(path), arch, outtype, want.layers, want.experts, want.top_k, len(want.moe_layers),
                       len(shapes), path.stat().st_size)

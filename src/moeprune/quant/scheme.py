"""`QuantScheme`: what a quantization stage stores, validated before any work.

    bits        integer width of the weights, 2..8 (compressed-tensors' pack-quantized format packs 1..8-bit
                integers densely into int32; 1 bit leaves a symmetric range {-1, 0} and is refused)
    group_size  weights per scale along the input dimension (one scale per row and group); must divide every
                quantized matrix's input features
    symmetric   True: zero point 0 (what vLLM's int kernels serve); False: a per-group zero point is stored too
    type        "int" (the only type here; FP8 / NVFP4 are other formats)
    parts       which modules are quantized: the routed experts always, plus "shared_experts" and/or "attention"

Scheme names (`SCHEMES`): w8a16, w4a16, w3a16, w2a16 = weights at 8 / 4 / 3 / 2 bits, activations unquantized
(16-bit). transformers 5 loads all four (each decompressed at load); vLLM's compressed-tensors WNA16 kernels serve 4
and 8 bits only (docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from moeprune.errors import MoePruneError
from moeprune.registry import Registry

MIN_BITS, MAX_BITS = 2, 8  # what pack-quantized stores (and what a symmetric range makes sense for)
PARTS = ("routed_experts", "shared_experts", "attention")
OPTIONAL_PARTS = PARTS[1:]


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    type: str = "int"
    parts: tuple[str, ...] = ("routed_experts",)
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise MoePruneError(f"group size must be a positive integer (32, 64, 128, ...), got {self.group_size!r}.")
        if not isinstance(self.symmetric, bool):
            raise MoePruneError(f"symmetric must be true or false, got {self.symmetric!r}.")
        if self.type != "int":
            raise MoePruneError(f"quantization type {self.type!r}: only integer weights ('int') are stored here.")
        parts = tuple(self.parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise MoePruneError(f"quantized parts {unknown}: choose among {', '.join(PARTS)}.")
        object.__setattr__(self, "parts", ("routed_experts", *[p for p in OPTIONAL_PARTS if p in parts]))

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def with_bits(self, bits: int) -> QuantScheme:
        return replace(self, bits=bits, name=f"w{bits}a16")

    def check_divides(self, in_features: int, what: str) -> None:
        if in_features % self.group_size:
            divisors = [g for g in (16, 32, 64, 128) if in_features % g == 0]
            raise MoePruneError(f"group size {self.group_size} does not divide the {in_features} input features of "
                                f"{what}; choose one that does (e.g. {', '.join(map(str, divisors)) or 'a divisor'}).")

    def to_dict(self) -> dict:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "type": self.type, "parts": list(self.parts)}

    @classmethod
    def from_dict(cls, raw: dict) -> QuantScheme:
        return cls(int(raw["bits"]), int(raw["group_size"]), bool(raw["symmetric"]), raw.get("type", "int"),
                   tuple(raw.get("parts", ("routed_experts",))), raw.get("name", ""))


def check_bits(bits: object) -> int:
    """A bit width the format stores, else a MoePruneError naming what it stores."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise MoePruneError(f"{bits!r} bits: compressed-tensors' pack-quantized format stores integer weights of "
                            f"{MIN_BITS}..{MAX_BITS} bits (vLLM serves 4 and 8); choose one of the schemes "
                            f"{', '.join(SCHEMES)} or bits in that range.")
    return bits


SCHEMES: Registry[int] = Registry("quantization scheme", "wNa16 = N-bit integer weights, 16-bit activations.")
for _bits in (8, 4, 3, 2):
    SCHEMES.register(f"w{_bits}a16", _bits)


def scheme_named(name: str, group_size: int = 128, symmetric: bool = True,
                 parts: tuple[str, ...] = ("routed_experts",)) -> QuantScheme:
    return QuantScheme(SCHEMES.get(name), group_size, symmetric, "int", parts, name)

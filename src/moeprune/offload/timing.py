"""Time per token of an offloaded MoE model: one decoded token, batch 1, the experts' link is the bottleneck.

Sizes come from the checkpoint's safetensors headers (`quant.model_sizes`: one routed expert's stored bytes b and
parameters P_e; P_o = every other parameter, counted at the experts' stored width). With link bandwidth W
(bytes/s, e.g. PCIe 25 GB/s) and device rate F (FLOP/s), per MoE layer ℓ of n:

    β   = b / W                                     seconds to move one expert
    c   = 2 · (k · P_e + P_o / n) / F               compute of one layer for one token (the non-expert work —
                                                    attention, norms, router, embeddings/head — spread evenly
                                                    over the MoE layers)
    d_ℓ = demand loads, q_ℓ = prefetch loads of the token at layer ℓ (offload/cache.py)

A demand load stalls: layer ℓ cannot run until its missing experts arrived, and nothing overlaps it. A prefetch
for layer ℓ is issued as soon as layer ℓ−1 has routed the token and runs on the link while layer ℓ−1 computes; the
part longer than that compute stalls layer ℓ:

    time_ℓ(t) = c + d_ℓ(t)·β + max(0, q_ℓ(t)·β − c)
    time(t)   = Σ_ℓ time_ℓ(t);   reported: the mean over tokens, and slowdown = time / (n·c)

n·c is the time with every expert resident (no transfers; also the time of a statically pruned model: pruning
keeps k experts active per token). Resident expert memory: m experts per layer = m·n·b bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.errors import MoePruneError

GB = 1e9
TFLOP = 1e12


@dataclass(frozen=True)
class TimingModel:
    expert_bytes: int  # b: one routed expert at its stored dtype
    expert_params: int  # P_e
    other_params: int  # P_o
    moe_layers: int  # n
    top_k: int  # k
    bandwidth: float = 25.0  # W in GB/s (10^9 bytes/s)
    tflops: float = 100.0  # F in TFLOP/s (10^12 FLOP/s)

    def __post_init__(self) -> None:
        for name in ("bandwidth", "tflops"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v != v or v == float("inf"):
                flag = "--bandwidth GB/s" if name == "bandwidth" else "--flops TFLOP/s"
                raise MoePruneError(f"{flag} {v!r}: give a positive finite number (e.g. 25 for PCIe 4 x16, 100).")
        if self.expert_bytes < 1 or self.moe_layers < 1 or self.top_k < 1:
            raise MoePruneError("the timing model needs positive expert bytes, MoE layers and top-k.")

    @classmethod
    def from_checkpoint(cls, path: str | Path, bandwidth: float = 25.0, tflops: float = 100.0) -> TimingModel:
        from moeprune.io.checkpoint import Checkpoint
        from moeprune.quant.model_sizes import model_sizes
        from moeprune.quant.sizes import STORED, PackedFormat

        if Checkpoint.open(path).quantization is not None:
            raise MoePruneError(f"{path} is quantized; the offloading timing model sizes experts at their stored "
                                "dtype from an unquantized checkpoint. Run --offload on the unquantized model.")
        sizes, adapter, _ = model_sizes(path)
        b = sizes.expert.bytes(STORED, PackedFormat())
        other = (sizes.fixed + sizes.router) // sizes.expert.stored_bytes
        return cls(b, sizes.expert.params, other, len(sizes.layers), adapter.top_k, bandwidth, tflops)

    @property
    def transfer_s(self) -> float:
        """β: seconds to move one expert."""
        return self.expert_bytes / (self.bandwidth * GB)

    @property
    def compute_s(self) -> float:
        """c: seconds of one layer's compute for one token."""
        return 2.0 * (self.top_k * self.expert_params + self.other_params / self.moe_layers) / (self.tflops * TFLOP)

    @property
    def resident_s(self) -> float:
        """n·c: a token's time with every needed expert resident."""
        return self.moe_layers * self.compute_s

    def token_times(self, demand: torch.Tensor, prefetch: torch.Tensor) -> torch.Tensor:
        """demand, prefetch [n, T] loads per layer and token -> time(t) [T] in seconds (module docstring)."""
        if demand.shape != prefetch.shape or demand.dim() != 2 or demand.shape[0] != self.moe_layers:
            raise MoePruneError(f"demand/prefetch must both be [{self.moe_layers}, T]; got {list(demand.shape)} and "
                                f"{list(prefetch.shape)}")
        c, beta = self.compute_s, self.transfer_s
        per_layer = c + demand.double() * beta + (prefetch.double() * beta - c).clamp(min=0)  # [n, T]
        return per_layer.sum(0)  # [T]

    def memory(self, experts_per_layer: float) -> int:
        """Bytes of resident routed experts when every MoE layer holds `experts_per_layer`."""
        return int(round(experts_per_layer * self.moe_layers * self.expert_bytes))

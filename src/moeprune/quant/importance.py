"""Loss tables loss[e, b]: what quantizing routed expert e to width b is predicted to cost.

Micro-expert k of expert j (CAMERA's unit, HEAPr's "atomic expert"): row k of gate and up, column k of down. For a
fake quantizer Q_b (quantize then dequantize, whole matrices, groups along the input dimension):

    err[j, k, b] = ‖gate_jk − Q_b(gate_j)_k‖² + ‖up_jk − Q_b(up_j)_k‖² + ‖down_j[:, k] − Q_b(down_j)[:, k]‖²
    norm[j, k]   = ‖gate_jk‖² + ‖up_jk‖² + ‖down_j[:, k]‖²                       (`MicroErrors`, one MoE layer)

Every importance kind is a weight ω[j, k] ≥ 0 per micro-expert, and

    loss[j, b] = Σ_k ω[j, k] · err[j, k, b]                       removing expert j costs  Σ_k ω[j, k] · norm[j, k]

(removal = quantizing to zero: err = norm), so removal, neuron removal and quantization share one unit within a
kind (`moeprune budget` relies on it). The kinds (`IMPORTANCE`):

- pmq (MC#): ω[j, k] = f_j / Σ_k norm[j, k], f_j = |A_j| / T (activation frequency: routed tokens over tokens), so
      loss[j, b] = f_j · ‖W_j − Q_b(W_j)‖² / ‖W_j‖²          (frequency × relative weight error of the expert).
  The error is the relative Frobenius error of the weights, not the output error on the expert's routed tokens: a
  statistics file holds no per-expert input moments, so the output error needs a second pass over calibration
  text with per-expert Gram matrices (part A's GPTQ collects them); the weight error is data-free, computed once
  per (expert, width), and exact in the relative sense when the routed inputs are isotropic.
- camera (CAMERA-Q): ω[j, k] = I[j, k] / norm[j, k] with I the CAMERA-P micro-expert energy
      I[j, k] = ‖down_j[:, k]‖² · [(1 − ρ) Σ_{A_j} (ĝ_j h_k)² + ρ max_{A_j} (ĝ_j h_k)²]      (ρ = 0.9)
  so loss[j, b] = Σ_k I[j, k] · err[j, k, b] / norm[j, k]: each micro-expert's energy × its relative error, at the
  granularity of micro-experts, summed per expert (the allocation gives one width per expert). Needs neuron
  statistics (`stats/neurons.py`), i.e. a pass over calibration text.

Experts with zero weight norm (or never routed) have ω = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.quant.sizes import STORED
from moeprune.registry import Registry
from moeprune.stats.neurons import NeuronLayerStats
from moeprune.stats.routed import RoutedStats

FakeQuant = Callable[[torch.Tensor, int], torch.Tensor]  # (W [out, in], bits) -> dequantize(quantize(W)) [out, in]


@dataclass
class MicroErrors:
    """One MoE layer: err [E, I, B] and norm [E, I] (float64), for `widths` (see the module docstring)."""

    widths: tuple[int, ...]
    err: torch.Tensor  # [E, I, B]
    norm: torch.Tensor  # [E, I]

    def removal(self, omega: torch.Tensor) -> torch.Tensor:
        """[E]: loss of removing each expert, Σ_k ω·norm."""
        return (omega * self.norm).sum(dim=1)


def rtn_fake_quant(group_size: int, symmetric: bool = True) -> FakeQuant:
    """compressed-tensors' round-to-nearest (`moeprune.quant.rtn.fake_quantize`, the quantization stage's own)."""
    try:
        from moeprune.quant.rtn import fake_quantize
    except ImportError:
        raise MoePruneError("quantization errors need moeprune.quant.rtn (the quantize stage), which this build does "
                            "not have yet; pass a fake quantizer to the library call instead.") from None
    return lambda w, bits: fake_quantize(w, bits, group_size, symmetric)


@torch.no_grad()
def micro_errors(roles: dict[str, torch.Tensor], widths: tuple[int, ...], fake_quant: FakeQuant) -> MicroErrors:
    """From one layer's expert weights by canonical role (gate/up [E, I, H], down [E, H, I]; gate may be absent)."""
    down = roles["down"]
    E, H, I = down.shape
    mats = [(roles[r], 1) for r in ("gate", "up") if r in roles] + [(down, 0)]  # (weights, dim summed to [I])
    err = torch.zeros(E, I, len(widths), dtype=torch.float64)
    norm = torch.zeros(E, I, dtype=torch.float64)
    for w, dim in mats:
        for j in range(E):
            wj = w[j] if w[j].dtype == torch.float64 else w[j].float()  # [out, in]
            norm[j] += wj.double().square().sum(dim=dim)  # [I]
            for n, b in enumerate(widths):
                if b < STORED:
                    q = fake_quant(wj, b)
                    if tuple(q.shape) != tuple(wj.shape):
                        raise MoePruneError(f"the fake quantizer returned shape {tuple(q.shape)} for a weight of "
                                            f"shape {tuple(wj.shape)}.")
                    err[j, :, n] += (wj.double() - q.double()).square().sum(dim=dim)  # [I]
    return MicroErrors(tuple(widths), err, norm)


def model_errors(model: nn.Module, adapter: MoEAdapter, widths: tuple[int, ...], fake_quant: FakeQuant,
                 layers: list[int] | None = None) -> dict[int, MicroErrors]:
    """`micro_errors` of every MoE layer (or `layers`) of an in-memory model."""
    layers = adapter.moe_layers() if layers is None else layers
    out = {}
    for n, layer in enumerate(bar := tqdm(layers, leave=False)):
        bar.set_description(f"quantization errors (layer {n + 1}/{len(layers)})")
        out[layer] = micro_errors(adapter.expert_roles(adapter.block(model, layer)), widths, fake_quant)
    return out


# ---------------------------------------------------------------------------------------------------- importance
@dataclass(frozen=True)
class ImportanceInputs:
    """What the kinds may read, per MoE layer."""

    errors: dict[int, MicroErrors]
    routed: dict[int, RoutedStats] | None = None
    neurons: dict[int, NeuronLayerStats] | None = None
    rho: float = 0.9


@dataclass(frozen=True)
class Importance:
    name: str
    needs: str  # "routed" (a statistics file) or "neurons" (neuron statistics: a pass over calibration text)
    omega: Callable[[ImportanceInputs, int], torch.Tensor]  # (inputs, layer) -> ω [E, I]
    reference: str


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / b.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(a))


def _pmq(x: ImportanceInputs, layer: int) -> torch.Tensor:
    s, errs = x.routed[layer], x.errors[layer]
    freq = s.sums["count"].double() / s.sums["tokens"].double().clamp_min(1)  # [E]
    total = errs.norm.sum(dim=1)  # [E] ‖W_j‖²
    return _ratio(freq, total)[:, None].expand_as(errs.norm)  # [E, I]


def _camera(x: ImportanceInputs, layer: int) -> torch.Tensor:
    from moeprune.criteria.neurons import NEURON_CRITERIA

    if not 0.0 <= x.rho <= 1.0:
        raise MoePruneError(f"CAMERA rho must lie in [0, 1], got {x.rho}.")
    energy = NEURON_CRITERIA.get("camera").fn(x.neurons[layer], rho=x.rho).double()  # [E, I] CAMERA-P I[j, k]
    return _ratio(energy, x.errors[layer].norm)


IMPORTANCE: Registry[Importance] = Registry("importance", "pmq: frequency × error (statistics file); camera: "
                                                          "micro-expert energy × error (neuron statistics).")
IMPORTANCE.register("pmq", Importance("pmq", "routed", _pmq, "MC# (PMQ)"))
IMPORTANCE.register("camera", Importance("camera", "neurons", _camera, "CAMERA-Q"))


def omegas(kind: str, inputs: ImportanceInputs) -> dict[int, torch.Tensor]:
    """{layer: ω [E, I]} of importance `kind`, checked against what it needs."""
    imp = IMPORTANCE.get(kind)
    have = {"routed": inputs.routed, "neurons": inputs.neurons}[imp.needs]
    if have is None:
        raise MoePruneError(f"importance {kind!r} needs {imp.needs} statistics"
                            + (" (a pass over calibration text: give --calib)." if imp.needs == "neurons" else "."))
    out = {}
    for layer, errs in sorted(inputs.errors.items()):
        if layer not in have:
            raise MoePruneError(f"importance {kind!r}: no {imp.needs} statistics for MoE layer {layer}.")
        w = imp.omega(inputs, layer)
        if tuple(w.shape) != tuple(errs.norm.shape):
            raise MoePruneError(f"importance {kind!r}, layer {layer}: statistics for {tuple(w.shape)} experts × "
                                f"neurons, weights {tuple(errs.norm.shape)}: statistics of another model?")
        out[layer] = w
    return out


def loss_tables(kind: str, inputs: ImportanceInputs) -> dict[int, torch.Tensor]:
    """{layer: loss [E, B]} = Σ_k ω[j, k] · err[j, k, b]."""
    return {layer: torch.einsum("ek,ekb->eb", w, inputs.errors[layer].err)  # [E, B]
            for layer, w in omegas(kind, inputs).items()}

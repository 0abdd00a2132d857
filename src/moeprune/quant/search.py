"""`moeprune budget`'s search: expert-removal ratio × neuron ratio × bit widths at one byte budget.

The predicted loss of a recipe, in the unit of one importance kind (quant/importance.py: ω[j, k] per micro-expert,
norm and err from the weights):

    L(r, ν, b) =  Σ_{j removed}          Σ_k ω[j,k]·norm[j,k]             expert removal (r, chosen by the criterion)
               +  Σ_{j kept} Σ_{k ∉ K_j} ω[j,k]·norm[j,k]                neuron removal (ν: the I' of highest ω·norm
                                                                           kept per expert, CAMERA's own ordering)
               +  Σ_{j kept} Σ_{k ∈ K_j} ω[j,k]·err[j,k,b_j]             quantization (b from the ILP, allocate.py)

reported as a share of Σ_all ω·norm (the loss of removing every routed expert: 1.0). Removal is quantization to
zero (err = norm), so the three terms share a unit. Assumptions, each a source of error:
- losses add up: no interaction between the removed experts and the quantization of the kept ones, and none
  across layers (every layer counts alike, in the importance's unit);
- removed experts' router mass is not redistributed (the model renormalises top-k over the survivors);
- quantization errors are those of the full-width weights: after neuron removal the down projection's groups hold
  other columns, so the error of the kept columns changes slightly;
- pmq has no neuron information: its neuron ordering is by weight norm (ω is constant within an expert), while the
  recipe's neuron stage (CAMERA-P) orders by energy; with --importance camera both agree.
Bytes are exact for the format (quant/sizes.py, quant/model_sizes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.routing import RoutingSpec
from moeprune.quant.allocate import Allocation, ExpertCosts, MaxBytes, allocate, check_budget
from moeprune.quant.importance import MicroErrors
from moeprune.quant.model_sizes import ModelSizes
from moeprune.quant.sizes import STORED, PackedFormat
from moeprune.select.neurons import check_budget as check_neuron_budget
from moeprune.select.neurons import expert_width_kept
from moeprune.select.uniform import drop_count, select_uniform

ALIGN = 8  # the neuron stage's kept-width alignment (stages/neurons.py)


@dataclass(frozen=True)
class Axes:
    """The grid searched, resolved for one model: (ratio, experts kept per layer) and (ratio, width kept)."""

    experts: list[tuple[float, int]]
    neurons: list[tuple[float, int]]


def axes(expert_ratios, neuron_ratios, sizes: ModelSizes, routing: RoutingSpec, group_size: int = 1) -> Axes:
    """Ratios the stages accept on this model, one per distinct result (0 = that stage is left out); kept widths
    that `group_size` does not divide are left out (the quantize stage refuses them)."""
    E, width = sizes.num_experts, sizes.expert.width
    experts, neurons = {E: 0.0}, {width: 0.0}
    for r in sorted(expert_ratios):
        if r:
            try:
                k = E - drop_count(r, E, routing)
            except MoePruneError as e:
                logger.debug("expert ratio %s skipped: %s", r, e)
                continue
            if k not in experts or abs(r - (1 - k / E)) < abs(experts[k] - (1 - k / E)):
                experts[k] = r  # of the ratios that keep k, the one nearest what they do
    for v in sorted(neuron_ratios):
        if v:
            try:
                check_neuron_budget(v, "expert", 1, width, align=ALIGN)
            except MoePruneError as e:
                logger.debug("neuron ratio %s skipped: %s", v, e)
                continue
            w = expert_width_kept(v, width, 1, ALIGN)
            if w % group_size:
                logger.debug("neuron ratio %s skipped: group size %d does not divide width %d", v, group_size, w)
                continue
            if w not in neurons or abs(v - (1 - w / width)) < abs(neurons[w] - (1 - w / width)):
                neurons[w] = v
    return Axes(sorted((r, k) for k, r in experts.items()), sorted((v, w) for w, v in neurons.items()))


def smallest_bytes(sizes: ModelSizes, ax: Axes, widths: tuple[int, ...], fmt: PackedFormat) -> int:
    """Bytes of the smallest model in the grid (shapes only: checked before any work)."""
    kept = min(k for _, k in ax.experts)
    width = min(w for _, w in ax.neurons)
    return sizes.fixed_after(kept) + len(sizes.layers) * kept * sizes.expert.narrowed(width).bytes(min(widths), fmt)


@dataclass
class Candidate:
    expert_ratio: float
    neuron_ratio: float
    kept: dict[int, list[int]]  # layer -> kept experts (original numbering)
    width: int  # neurons kept per expert
    allocation: Allocation  # widths of the kept experts (new numbering)
    removal: float  # predicted loss shares (of the loss of removing every routed expert)
    neurons: float
    quant: float
    bytes: int

    @property
    def loss(self) -> float:
        return self.removal + self.neurons + self.quant

    def recipe(self, criterion: str, neuron_method: str, group_size: int, symmetric: bool) -> dict:
        """The recipe (as `moeprune prune --recipe` reads it) that makes this candidate."""
        stages: list[dict] = []
        if self.expert_ratio:
            stages.append({"method": criterion, "ratio": self.expert_ratio})
        if self.neuron_ratio:
            stages.append({"method": neuron_method, "ratio": self.neuron_ratio})
        per_layer = self.allocation.per_layer()
        every = [b for bs in self.allocation.bits.values() for b in bs]
        if every and max(every) < STORED:  # quantized ({layer: bits} or {layer: {expert: bits}}, the stage's `bits`)
            bits = ({int(k): v for k, v in per_layer.items()} if per_layer is not None else
                    {int(k): dict(enumerate(v)) for k, v in self.allocation.bits.items()})
            common = max(set(every), key=every.count)
            stages.append({"method": "quantize", "scheme": f"w{common}a16", "algorithm": "rtn",
                           "group_size": group_size, "symmetric": symmetric, "bits": bits})
        return {"stages": stages}


def search(sizes: ModelSizes, ax: Axes, target: int, scores: dict[int, torch.Tensor], higher_keeps: bool,
           routing: RoutingSpec, errors: dict[int, MicroErrors], omega: dict[int, torch.Tensor],
           fmt: PackedFormat, granularity: str) -> list[Candidate]:
    """Every grid point that fits `target` bytes, best (least predicted loss) first."""
    widths = next(iter(errors.values())).widths
    mass = sum(float((omega[layer] * errors[layer].norm).sum()) for layer in errors) or 1.0
    out = []
    for ratio, n_kept in ax.experts:
        kept = ({layer: list(range(sizes.num_experts)) for layer in errors} if not ratio
                else select_uniform(scores, ratio, routing, higher_keeps))
        removal = sum(float(errors[layer].removal(omega[layer])[_dropped(kept[layer], sizes.num_experts)].sum())
                      for layer in errors)
        for nu, width in ax.neurons:
            loss, neuron_loss = {}, 0.0
            for layer, e in errors.items():
                w = omega[layer][kept[layer]]  # [K, I]
                gone = w * e.norm[kept[layer]]  # [K, I] loss of removing each neuron
                keep = gone.argsort(dim=1, descending=True, stable=True)[:, :width]  # [K, I'] highest kept
                mask = torch.zeros_like(w).scatter_(1, keep, 1.0)  # [K, I]
                neuron_loss += float((gone * (1 - mask)).sum())
                loss[layer] = torch.einsum("ek,ekb->eb", w * mask, e.err[kept[layer]])  # [K, B]
            shapes = {layer: [sizes.expert.narrowed(width)] * n_kept for layer in errors}
            budget = MaxBytes(target, sizes.fixed_after(n_kept))
            plain = ExpertCosts.from_shapes(shapes, (STORED,), fmt)  # left unquantized: no quantization loss
            plain_bytes = budget.fixed + sum(int(t.sum()) for t in plain.nbytes.values())
            if plain_bytes <= target:
                bits = {layer: [STORED] * n_kept for layer in errors}
                alloc = Allocation((STORED,), granularity, bits, 0.0, plain_bytes - budget.fixed,
                                   budget.capacity(plain), budget.unit)
                out.append(Candidate(ratio, nu, kept, width, alloc, removal / mass, neuron_loss / mass, 0.0,
                                     plain_bytes))
            costs = ExpertCosts.from_shapes(shapes, widths, fmt).with_loss(loss)
            try:
                check_budget(costs, budget, granularity)
            except MoePruneError:
                continue  # this grid point does not fit at any width
            alloc = allocate(costs, budget, granularity)
            out.append(Candidate(ratio, nu, kept, width, alloc, removal / mass, neuron_loss / mass,
                                 alloc.loss / mass, budget.fixed + alloc.cost))
    if not out:
        raise MoePruneError(f"no recipe in the grid fits {target:,} bytes; widen the grid (more removal, narrower "
                            "widths) or raise the budget.")
    return sorted(out, key=lambda c: c.loss)


def _dropped(kept: list[int], E: int) -> torch.Tensor:
    mask = torch.ones(E, dtype=torch.bool)
    mask[kept] = False
    return mask

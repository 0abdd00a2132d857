"""Mixed precision: a bit width per routed expert (or per MoE layer) from an integer linear program.

With binary x[g, b] = 1 when group g (an expert, or a whole MoE layer) gets width b ∈ W:

    minimise   Σ_g Σ_b loss[g, b] · x[g, b]                   (= maximise the importance retained)
    subject to Σ_b x[g, b] = 1                      for every g
               Σ_g Σ_b cost[g, b] · x[g, b] ≤ C
               x[g, b] ∈ {0, 1}

solved by `scipy.optimize.milp` (HiGHS, relative gap 0). loss[g, b] comes from `quant/importance.py`; for a layer
group it is the sum over the layer's experts (one width for all of them, as vLLM applies one scheme per fused MoE
layer). The budget sets cost and C (`AvgBits`, `MaxBytes`). Costs are integers and the solution is re-checked in
integers: the chosen cost never exceeds C (a solver tolerance that lets it creep over tightens C and re-solves).
A budget below the smallest model (every group at its cheapest width) is refused by `check_budget`, which needs
only the cost table (shapes), before any error or importance is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.quant.sizes import STORED, ExpertShape, PackedFormat, check_width
from moeprune.registry import Registry


# ---------------------------------------------------------------------------------------------------- cost tables
@dataclass
class ExpertCosts:
    """What each expert costs at each width, per MoE layer: bytes [E, B] and nominal bits·params [E, B] (int64),
    and (filled later) the predicted loss [E, B] (float64). `widths` are sorted ascending."""

    widths: tuple[int, ...]
    nbytes: dict[int, torch.Tensor]  # layer -> [E, B] int64
    nbits: dict[int, torch.Tensor]  # layer -> [E, B] int64: (b, or the stored dtype's bits for b ≥ 16) · params
    params: int  # quantized weights of all routed experts together
    loss: dict[int, torch.Tensor] | None = None  # layer -> [E, B] float64

    @classmethod
    def from_shapes(cls, shapes: dict[int, list[ExpertShape]], widths: tuple[int, ...],
                    fmt: PackedFormat) -> ExpertCosts:
        widths = check_widths(widths)
        nbytes, nbits, params = {}, {}, 0
        for layer, experts in sorted(shapes.items()):
            nbytes[layer] = torch.tensor([[s.bytes(b, fmt) for b in widths] for s in experts],
                                         dtype=torch.int64).reshape(len(experts), len(widths))  # [E, B]
            nbits[layer] = torch.tensor([[(b if b < STORED else 8 * s.stored_bytes) * s.params for b in widths]
                                         for s in experts], dtype=torch.int64).reshape(len(experts), len(widths))
            params += sum(s.params for s in experts)
        return cls(widths, nbytes, nbits, params)

    @property
    def layers(self) -> list[int]:
        return sorted(self.nbytes)

    def with_loss(self, loss: dict[int, torch.Tensor]) -> ExpertCosts:
        for layer in self.layers:
            if layer not in loss or tuple(loss[layer].shape) != tuple(self.nbytes[layer].shape):
                got = None if layer not in loss else tuple(loss[layer].shape)
                raise MoePruneError(f"layer {layer}: loss table of shape {got}, expected "
                                    f"{tuple(self.nbytes[layer].shape)} (experts × widths {self.widths}).")
            if not torch.isfinite(loss[layer]).all() or (loss[layer] < 0).any():
                raise MoePruneError(f"layer {layer}: the loss table holds negative or non-finite values.")
        return ExpertCosts(self.widths, self.nbytes, self.nbits, self.params,
                           {k: v.double() for k, v in loss.items() if k in self.nbytes})


def check_widths(widths) -> tuple[int, ...]:
    widths = tuple(sorted({check_width(b) for b in widths}))
    if not widths:
        raise MoePruneError("give at least one bit width (e.g. 2,3,4,8).")
    return widths


# ---------------------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class AvgBits:
    """Σ_e b_e · n_e ≤ B · Σ_e n_e over the routed experts' quantized weights n_e (nominal widths: scales and
    zero points are not counted; an unquantized expert counts its stored dtype's bits)."""

    bits: float

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not self.bits > 0:
            raise MoePruneError(f"--avg-bits must be a positive number like 3.0, got {self.bits!r}.")

    unit = "bit·params"

    def table(self, costs: ExpertCosts) -> dict[int, torch.Tensor]:
        return costs.nbits

    def capacity(self, costs: ExpertCosts) -> int:
        return math.floor(self.bits * costs.params + 1e-9)

    def describe(self) -> str:
        return f"{self.bits:g} average bits"


@dataclass(frozen=True)
class MaxBytes:
    """Bytes of the whole checkpoint: `fixed` (everything but the routed experts' quantized weights, at their
    stored dtypes) + Σ_e bytes(e, b_e) ≤ `total`."""

    total: int
    fixed: int = 0

    def __post_init__(self) -> None:
        for name in ("total", "fixed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MoePruneError(f"--max-bytes: {name} must be a non-negative integer of bytes, got {v!r}.")

    unit = "bytes"

    def table(self, costs: ExpertCosts) -> dict[int, torch.Tensor]:
        return costs.nbytes

    def capacity(self, costs: ExpertCosts) -> int:
        return self.total - self.fixed

    def describe(self) -> str:
        return f"{self.total:,} bytes (non-expert part {self.fixed:,})"


Budget = AvgBits | MaxBytes


# ---------------------------------------------------------------------------------------------------- granularity
@dataclass(frozen=True)
class Granularity:
    """How experts are grouped under one width: `key(layer, expert)` names the group."""

    name: str
    servable: str  # what serves an allocation of this granularity

    def groups(self, costs: ExpertCosts) -> list[tuple[int, list[int]]]:
        raise NotImplementedError


class PerExpert(Granularity):
    def groups(self, costs):
        return [(layer, [e]) for layer in costs.layers for e in range(costs.nbytes[layer].shape[0])]


class PerLayer(Granularity):
    def groups(self, costs):
        return [(layer, list(range(costs.nbytes[layer].shape[0]))) for layer in costs.layers]


GRANULARITIES: Registry[Granularity] = Registry("granularity", "expert: a width per expert; layer: one per MoE layer.")
GRANULARITIES.register("expert", PerExpert("expert", "no stock serving stack (vLLM: one scheme per fused MoE layer)"))
GRANULARITIES.register("layer", PerLayer("layer", "vLLM (one compressed-tensors config group per width)"))


def grouped(costs: ExpertCosts, table: dict[int, torch.Tensor], granularity: str) -> tuple[list, np.ndarray]:
    """(groups, cost [G, B]) with cost summed over each group's experts."""
    groups = GRANULARITIES.get(granularity).groups(costs)
    cost = np.array([table[layer][members].sum(0).tolist() for layer, members in groups],
                    dtype=np.int64).reshape(len(groups), len(costs.widths))  # [G, B]
    return groups, cost


# ---------------------------------------------------------------------------------------------------- allocation
@dataclass
class Allocation:
    widths: tuple[int, ...]
    granularity: str
    bits: dict[int, list[int]]  # layer -> width of each expert
    loss: float  # predicted loss Σ loss[e, b_e]
    cost: int  # in the budget's unit
    capacity: int
    unit: str

    def per_layer(self) -> dict[int, int] | None:
        """One width per layer, or None when a layer holds several."""
        out = {layer: b[0] for layer, b in self.bits.items() if b}
        return out if all(len(set(b)) <= 1 for b in self.bits.values()) else None

    def average_bits(self, costs: ExpertCosts) -> float:
        total = sum(int(costs.nbits[layer][e, costs.widths.index(b)]) for layer, bs in self.bits.items()
                    for e, b in enumerate(bs))
        return total / max(1, costs.params)

    def to_dict(self) -> dict:
        return {"granularity": self.granularity, "widths": list(self.widths), "loss": self.loss, "cost": self.cost,
                "capacity": self.capacity, "unit": self.unit,
                "bits": {str(k): (v[0] if len(set(v)) == 1 else v) for k, v in self.bits.items()}}


def check_budget(costs: ExpertCosts, budget: Budget, granularity: str = "expert") -> int:
    """The capacity, or a clear error when even every group at its cheapest width does not fit (before any work)."""
    GRANULARITIES.get(granularity)
    capacity = budget.capacity(costs)
    least = sum(int(t.min(dim=1).values.sum()) for t in budget.table(costs).values())
    if least > capacity:
        raise MoePruneError(f"budget {budget.describe()} is below the smallest possible model: every routed expert "
                            f"at {costs.widths[0]} bits needs {least:,} {budget.unit} for the experts alone, "
                            f"{capacity:,} are left for them. Raise the budget, allow a narrower width, or remove "
                            "experts first.")
    return capacity


def allocate(costs: ExpertCosts, budget: Budget, granularity: str = "expert") -> Allocation:
    """The widths of least predicted loss under the budget (see the module docstring)."""
    if costs.loss is None:
        raise MoePruneError("allocate needs a loss table: costs.with_loss(...) (quant/importance.py).")
    capacity = check_budget(costs, budget, granularity)
    groups, cost = grouped(costs, budget.table(costs), granularity)
    loss = np.array([costs.loss[layer][members].sum(0).tolist() for layer, members in groups],
                    dtype=np.float64).reshape(cost.shape)  # [G, B]
    choice = solve_choice(loss, cost, capacity)
    bits = {layer: [0] * costs.nbytes[layer].shape[0] for layer in costs.layers}
    for (layer, members), c in zip(groups, choice, strict=True):
        for e in members:
            bits[layer][e] = costs.widths[c]
    total = int(cost[np.arange(len(groups)), choice].sum())
    predicted = float(loss[np.arange(len(groups)), choice].sum())
    logger.debug("allocation (%s, %s): predicted loss %.6g, %s of %s %s", granularity, budget.describe(), predicted,
                f"{total:,}", f"{capacity:,}", budget.unit)
    return Allocation(costs.widths, granularity, bits, predicted, total, capacity, budget.unit)


@dataclass
class Lift:
    """A per-expert allocation lifted to one width per layer under the same budget."""

    per_expert: Allocation
    per_layer: Allocation

    @property
    def loss_of_lifting(self) -> float:
        """Predicted loss added by serving one width per layer (≥ 0: the per-layer choices are a subset)."""
        return self.per_layer.loss - self.per_expert.loss

    def to_dict(self) -> dict:
        return {"per_expert_loss": self.per_expert.loss, "per_layer_loss": self.per_layer.loss,
                "loss_of_lifting": self.loss_of_lifting, "per_layer": self.per_layer.to_dict()}


def lift_per_layer(costs: ExpertCosts, per_expert: Allocation, budget: Budget) -> Lift:
    """The best per-layer allocation under the budget `per_expert` was made for, and what lifting costs."""
    if per_expert.granularity != "expert":
        raise MoePruneError("lift_per_layer takes a per-expert allocation, got granularity "
                            f"{per_expert.granularity!r}.")
    lifted = allocate(costs, budget, "layer")
    lift = Lift(per_expert, lifted)
    logger.info("lifting to one width per layer adds %.6g to the predicted loss (%.6g -> %.6g)",
                lift.loss_of_lifting, per_expert.loss, lifted.loss)
    return lift


def solve_choice(loss: np.ndarray, cost: np.ndarray, capacity: int, *, retries: int = 5) -> np.ndarray:
    """argmin over one choice c_g per row of Σ_g loss[g, c_g] s.t. Σ_g cost[g, c_g] ≤ capacity (integers).

    loss, cost: [G, B]. Returns the choices [G] (int). A multiple-choice knapsack, solved as a MILP."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    G, B = cost.shape
    least = int(cost.min(axis=1).sum())
    if least > capacity:
        raise MoePruneError(f"no allocation fits: the cheapest needs {least:,}, the budget is {capacity:,}.")
    scale_loss = float(np.abs(loss).max()) or 1.0
    scale_cost = float(np.abs(cost).max()) or 1.0
    rows = np.repeat(np.arange(G), B)
    one_hot = csr_array((np.ones(G * B), (rows, np.arange(G * B))), shape=(G, G * B))  # [G, G·B]
    c = (loss / scale_loss).reshape(-1)  # [G·B]
    limit = capacity
    for _ in range(retries):
        budget_row = LinearConstraint((cost / scale_cost).reshape(1, -1), -np.inf, limit / scale_cost)
        res = milp(c, constraints=[LinearConstraint(one_hot, 1, 1), budget_row], integrality=np.ones(G * B),
                   bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise MoePruneError(f"the allocation program found no solution ({res.message}).")
        choice = res.x.reshape(G, B).argmax(axis=1)  # [G]
        used = int(cost[np.arange(G), choice].sum())
        if used <= capacity:
            return choice
        limit -= used - capacity  # solver tolerance let the integer cost creep over: tighten and solve again
    raise MoePruneError(f"the allocation program kept exceeding the budget by solver tolerance ({used:,} > "
                        f"{capacity:,}); raise the budget slightly.")

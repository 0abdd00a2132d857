"""Mixed-precision allocation (quant/allocate.py) and importance tables (quant/importance.py).

References are independent of the code checked: brute force over every assignment, byte counts and round-to-nearest
written out here from their formulas, frequencies and errors computed from the model's own parameters."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.quant.allocate import (
    AvgBits,
    ExpertCosts,
    MaxBytes,
    allocate,
    check_budget,
    lift_per_layer,
)
from moeprune.quant.importance import ImportanceInputs, loss_tables, micro_errors, model_errors
from moeprune.quant.sizes import ExpertShape, PackedFormat
from moeprune.stats.neurons import NeuronLayerStats
from moeprune.stats.routed import RoutedStats

WIDTHS = (2, 3, 4, 8)


# ----------------------------------------------------------------------------------------------- references
def rtn_reference(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest per group of `group` input columns, written out plainly (not moeprune's)."""
    out = torch.empty_like(w, dtype=torch.float64)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            g = w[r, c0:c0 + group].double()
            scale = g.abs().max() / ((qmax - qmin) / 2)
            scale = scale if scale > 0 else torch.tensor(1.0, dtype=torch.float64)
            out[r, c0:c0 + group] = torch.clamp(torch.round(g / scale), qmin, qmax) * scale
    return out


def random_costs(rng: np.random.Generator, layers: int, experts: int, widths=WIDTHS) -> ExpertCosts:
    """Random integer byte costs rising with width, random losses falling with width."""
    B = len(widths)
    nbytes, nbits, loss = {}, {}, {}
    for layer in range(layers):
        base = rng.integers(50, 200, size=(experts, 1))
        nbytes[layer] = torch.tensor(base * np.array(widths) + rng.integers(0, 30, size=(experts, B)))
        nbits[layer] = torch.tensor(np.array(widths)[None, :] * np.full((experts, 1), 10))
        lo = rng.random((experts, 1)) * 5
        loss[layer] = torch.tensor(lo * np.exp(-np.array(widths)[None, :] * rng.random((experts, 1)))
                                   + rng.random((experts, B)) * 0.01 * (B - np.arange(B)))
    costs = ExpertCosts(WIDTHS, nbytes, nbits, params=layers * experts * 10)
    return costs.with_loss(loss)


def brute_force(costs: ExpertCosts, capacity: int, per_layer: bool) -> tuple[float, tuple]:
    """Least total loss over every assignment whose bytes fit (and the assignment): all B^G of them enumerated."""
    layers = costs.layers
    if per_layer:
        groups = [(layer, list(range(costs.nbytes[layer].shape[0]))) for layer in layers]
    else:
        groups = [(layer, [e]) for layer in layers for e in range(costs.nbytes[layer].shape[0])]
    cost = np.array([costs.nbytes[layer][m].sum(0).numpy() for layer, m in groups])  # [G, B]
    loss = np.array([costs.loss[layer][m].sum(0).numpy() for layer, m in groups])  # [G, B]
    every = np.array(list(itertools.product(range(len(costs.widths)), repeat=len(groups))))  # [B^G, G]
    rows = np.arange(len(groups))
    total_cost = cost[rows, every].sum(1)  # [B^G]
    total_loss = np.where(total_cost <= capacity, loss[rows, every].sum(1), np.inf)
    best = int(np.argmin(total_loss))
    return float(total_loss[best]), tuple(int(c) for c in every[best])


def chosen(alloc, costs: ExpertCosts, per_layer: bool) -> tuple:
    if per_layer:
        return tuple(costs.widths.index(alloc.bits[layer][0]) for layer in costs.layers)
    return tuple(costs.widths.index(b) for layer in costs.layers for b in alloc.bits[layer])


# ----------------------------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("seed", range(6))
def test_per_expert_ilp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs = random_costs(rng, layers=2, experts=3)
    lo = sum(int(t.min(1).values.sum()) for t in costs.nbytes.values())
    hi = sum(int(t.max(1).values.sum()) for t in costs.nbytes.values())
    capacity = int(rng.integers(lo, hi))
    alloc = allocate(costs, MaxBytes(capacity), "expert")
    best, choice = brute_force(costs, capacity, per_layer=False)
    assert alloc.loss == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert chosen(alloc, costs, False) == choice  # random real losses: the optimum is unique
    assert alloc.cost <= capacity


@pytest.mark.parametrize("seed", range(6))
def test_per_layer_ilp_equals_brute_force_and_lifting_never_beats_per_expert(seed):
    rng = np.random.default_rng(100 + seed)
    costs = random_costs(rng, layers=4, experts=2)
    lo = sum(int(t.min(1).values.sum()) for t in costs.nbytes.values())
    hi = sum(int(t.max(1).values.sum()) for t in costs.nbytes.values())
    capacity = int(rng.integers(lo, hi))
    budget = MaxBytes(capacity)
    per_layer = allocate(costs, budget, "layer")
    best, choice = brute_force(costs, capacity, per_layer=True)
    assert per_layer.loss == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert chosen(per_layer, costs, True) == choice
    assert per_layer.per_layer() is not None and per_layer.cost <= capacity

    per_expert = allocate(costs, budget, "expert")
    lift = lift_per_layer(costs, per_expert, budget)
    assert lift.per_layer.loss == pytest.approx(best, rel=1e-9, abs=1e-12)  # lifting = the per-layer optimum
    assert lift.loss_of_lifting >= -1e-12
    assert per_expert.loss <= lift.per_layer.loss + 1e-12
    best_expert, _ = brute_force(costs, capacity, per_layer=False)
    assert per_expert.loss == pytest.approx(best_expert, rel=1e-9, abs=1e-12)


def packed_bytes_by_hand(out: int, inp: int, bits: int, group: int, scale_bytes: int) -> int:
    """compressed-tensors pack-quantized, symmetric: int32 words of dense b-bit values per row, one scale per
    group, the int64 [2] weight_shape."""
    return out * math.ceil(inp * bits / 32) * 4 + out * math.ceil(inp / group) * scale_bytes + 16


def test_budget_respected_in_bytes_and_tight_budget_is_reached():
    shape = ExpertShape(hidden=64, width=48, gated=True, stored_bytes=2)
    fmt = PackedFormat(group_size=32, symmetric=True, scale_bytes=2)
    for bits in WIDTHS:
        by_hand = 2 * packed_bytes_by_hand(48, 64, bits, 32, 2) + packed_bytes_by_hand(64, 48, bits, 32, 2)
        assert shape.bytes(bits, fmt) == by_hand
    assert shape.bytes(16, fmt) == 3 * 64 * 48 * 2  # left at bf16
    shapes = {layer: [shape] * 4 for layer in (1, 2)}
    costs = ExpertCosts.from_shapes(shapes, WIDTHS, fmt)
    rng = torch.Generator().manual_seed(0)
    costs = costs.with_loss({layer: torch.rand(4, 1, generator=rng, dtype=torch.float64) * torch.tensor(
        [1.0, 0.3, 0.1, 0.001], dtype=torch.float64) for layer in (1, 2)})
    fixed = 123_457
    # a budget equal to one assignment's exact bytes: 4 experts at 4 bits, 4 at 3 bits
    exact = fixed + 4 * shape.bytes(4, fmt) + 4 * shape.bytes(3, fmt)
    alloc = allocate(costs, MaxBytes(exact, fixed), "expert")
    total = fixed + sum(shape.bytes(b, fmt) for bs in alloc.bits.values() for b in bs)
    assert total == fixed + alloc.cost and total <= exact
    best, _ = brute_force(costs, exact - fixed, per_layer=False)  # over all 4^8 assignments
    assert alloc.loss == pytest.approx(best, rel=1e-9)
    with pytest.raises(MoePruneError, match="smallest possible model"):
        check_budget(costs, MaxBytes(fixed + 8 * shape.bytes(2, fmt) - 1, fixed))
    check_budget(costs, MaxBytes(fixed + 8 * shape.bytes(2, fmt), fixed))  # exactly the smallest model fits


def test_avg_bits_budget():
    shapes = {0: [ExpertShape(32, 16)] * 3, 1: [ExpertShape(32, 16)] * 3}
    costs = ExpertCosts.from_shapes(shapes, (2, 4, 8, 16), PackedFormat(16))
    costs = costs.with_loss({k: torch.tensor([[8.0, 4.0, 1.0, 0.0]] * 3, dtype=torch.float64) * (k + 1)
                             for k in (0, 1)})
    alloc = allocate(costs, AvgBits(3.0), "expert")
    assert alloc.average_bits(costs) <= 3.0
    assert alloc.average_bits(costs) == 3.0  # e.g. 4 experts at 2 and 2 at 4 bits: 3.0 exactly
    with pytest.raises(MoePruneError, match="smallest possible model"):
        check_budget(costs, AvgBits(1.5))
    with pytest.raises(MoePruneError, match="avg-bits"):
        AvgBits(-1)


def test_bad_widths_and_tables_refused():
    with pytest.raises(MoePruneError, match="cannot be stored"):
        ExpertCosts.from_shapes({0: [ExpertShape(8, 8)]}, (4, 12), PackedFormat(8))
    costs = ExpertCosts.from_shapes({0: [ExpertShape(8, 8)] * 2}, (2, 4), PackedFormat(8))
    with pytest.raises(MoePruneError, match="loss table"):
        costs.with_loss({0: torch.zeros(3, 2)})
    with pytest.raises(MoePruneError, match="granularity"):
        allocate(costs.with_loss({0: torch.zeros(2, 2)}), AvgBits(4), "neuron")


# ----------------------------------------------------------------------------------------------- importance
def test_pmq_table_is_frequency_times_relative_error_on_a_tiny_model():
    from moeprune.models import get_adapter
    from moeprune.tiny import tiny_model

    model = tiny_model("qwen3_moe", seed=3)
    adapter = get_adapter(model.config, model=model)
    group = 16
    fq = lambda w, b: rtn_reference(w, b, group)  # noqa: E731
    errors = model_errors(model, adapter, WIDTHS, fq)
    g = torch.Generator().manual_seed(0)
    routed = {}
    for layer in adapter.moe_layers():
        s = RoutedStats(8)
        s.sums["count"] = torch.randint(0, 50, (8,), generator=g).double()
        s.sums["tokens"] = torch.tensor([100.0], dtype=torch.float64)
        routed[layer] = s
    table = loss_tables("pmq", ImportanceInputs(errors, routed=routed))
    for layer in adapter.moe_layers():
        experts = model.model.layers[layer].mlp.experts
        I = experts.down_proj.shape[-1]
        for j in range(8):
            gate, up = experts.gate_up_proj[j, :I], experts.gate_up_proj[j, I:]  # [I, H] each
            mats = [m.detach() for m in (gate, up, experts.down_proj[j])]
            norm = sum(float(m.detach().double().square().sum()) for m in mats)
            freq = float(routed[layer].sums["count"][j]) / 100.0
            for n, b in enumerate(WIDTHS):
                err = sum(float((m.double() - rtn_reference(m, b, group)).square().sum()) for m in mats)
                assert float(table[layer][j, n]) == pytest.approx(freq * err / norm, rel=1e-9, abs=1e-15)
        assert (table[layer][:, 0] > table[layer][:, -1]).any()  # not all zero: 2 bits lose more than 8


def test_camera_table_is_energy_times_relative_micro_expert_error():
    torch.manual_seed(0)
    E, I, H = 3, 4, 16
    roles = {"gate": torch.randn(E, I, H), "up": torch.randn(E, I, H), "down": torch.randn(E, H, I)}
    fq = lambda w, b: rtn_reference(w, b, 8)  # noqa: E731
    errs = micro_errors(roles, (2, 4), fq)
    ns = NeuronLayerStats(E, I)
    ns.sums["gact_sq"] = torch.rand(E, I, dtype=torch.float64)
    ns.sums["gact_max"] = torch.rand(E, I, dtype=torch.float64)
    ns.sums["down_sq"] = roles["down"].double().square().sum(1)  # [E, I]
    table = loss_tables("camera", ImportanceInputs({5: errs}, neurons={5: ns}, rho=0.9))[5]
    for j in range(E):
        for n, b in enumerate((2, 4)):
            want = 0.0
            for k in range(I):
                energy = float(ns.sums["down_sq"][j, k]) * (0.1 * float(ns.sums["gact_sq"][j, k])
                                                            + 0.9 * float(ns.sums["gact_max"][j, k]))
                dg = roles["gate"][j] - rtn_reference(roles["gate"][j], b, 8).float()
                du = roles["up"][j] - rtn_reference(roles["up"][j], b, 8).float()
                dd = roles["down"][j] - rtn_reference(roles["down"][j], b, 8).float()
                err = float(dg[k].double().square().sum() + du[k].double().square().sum()
                            + dd[:, k].double().square().sum())
                norm = float(roles["gate"][j, k].double().square().sum() + roles["up"][j, k].double().square().sum()
                             + roles["down"][j, :, k].double().square().sum())
                want += energy * err / norm
            assert float(table[j, n]) == pytest.approx(want, rel=1e-5)
    with pytest.raises(MoePruneError, match="neurons statistics"):
        loss_tables("camera", ImportanceInputs({5: errs}))
    with pytest.raises(MoePruneError, match="Did you mean 'pmq'"):
        loss_tables("pqm", ImportanceInputs({5: errs}))

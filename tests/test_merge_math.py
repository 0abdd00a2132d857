"""The tensor math of expert merging (moeprune.merge): frequency-weighted averaging, Sub-MoE joint SVD and DERN's
assignment, checked against independent references (a hand-written SwiGLU expert, hand-computed averages,
torch.linalg.svd / svdvals). Alignment: tests/test_merge_align.py."""

from __future__ import annotations

import pytest
import torch

from expert_math import (
    H,
    I,
    assert_same_function,
    expert_forward,
    inputs,
    make_expert,
    random_perm,
)
from moeprune.errors import MoePruneError
from moeprune.merge import align_group, joint_svd_factors, merge_average, merge_svd, permutation_to, permute

# ----------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("merge", [merge_average, merge_svd])
@pytest.mark.parametrize("bias", [False, True])
def test_group_of_one_is_the_identity(merge, bias):
    e = make_expert(13, bias=bias, dtype=torch.float32)
    out = merge([e], [0.7])
    assert set(out) == set(e)
    for role in e:
        assert out[role].dtype == torch.float32
        if merge is merge_average:
            assert torch.equal(out[role], e[role]), role  # exact
        else:  # full-rank SVD: U S Vᵀ reproduces W to float64 round-off, exact after rounding to float32
            torch.testing.assert_close(out[role], e[role], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("merge", [merge_average, merge_svd])
def test_identical_experts_merge_to_the_expert(merge):
    e = make_expert(14, bias=True)
    out = merge([e, dict(e), dict(e)], [0.2, 0.5, 0.3])
    assert_same_function(out, e, 1e-6)
    for role in e:
        torch.testing.assert_close(out[role], e[role], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("merge", [merge_average, merge_svd])
def test_experts_identical_up_to_permutation_merge_to_the_expert(merge):
    e = make_expert(15, bias=True)
    group = [e, permute(e, random_perm(16)), permute(e, random_perm(17))]
    out = merge(group, [0.2, 0.5, 0.3])  # anchor = member 1 (largest weight)
    assert_same_function(out, e, 1e-6)
    for role in e:  # weights laid out as the anchor's
        torch.testing.assert_close(out[role], group[1][role], rtol=1e-9, atol=1e-9)
    # without alignment the same group does not merge to the expert (the alignment is what makes it work)
    x = inputs()
    unaligned = merge(group, [0.2, 0.5, 0.3], align=False)
    assert (expert_forward(unaligned, x) - expert_forward(e, x)).abs().max() > 1e-2


def test_weighted_average_by_hand():
    group = [make_expert(s, bias=True, dtype=torch.float32) for s in (20, 21, 22)]
    w = [3.0, 1.0, 0.5]
    out = merge_average(group, w, align=False)
    for role in group[0]:
        by_hand = (3.0 * group[0][role].double() + 1.0 * group[1][role].double() + 0.5 * group[2][role].double()) / 4.5
        assert out[role].dtype == torch.float32
        torch.testing.assert_close(out[role], by_hand.float(), rtol=0, atol=1e-6)
    # weights as a tensor, and a zero weight drops a member
    out2 = merge_average(group, torch.tensor([0.0, 2.0, 2.0]), align=False)
    torch.testing.assert_close(out2["gate"], (group[1]["gate"] + group[2]["gate"]) / 2, rtol=0, atol=1e-6)


def test_average_aligns_members_before_averaging():
    a, b = make_expert(23), make_expert(24)
    sigma = random_perm(25)
    out = merge_average([a, permute(b, sigma)], [2.0, 1.0])  # anchor a
    pi = permutation_to(a, permute(b, sigma))
    expected = (2 * a["gate"] + permute(permute(b, sigma), pi)["gate"]) / 3
    torch.testing.assert_close(out["gate"], expected, rtol=0, atol=1e-12)
    explicit = merge_average([a, permute(b, sigma)], [2.0, 1.0], anchor=1)
    assert not torch.allclose(explicit["gate"], out["gate"])  # anchor 1 lays the result out as member 1's neurons


# ----------------------------------------------------------------------------------------------- SVD


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_svd_rank_truncation_error_is_the_discarded_energy(rank):
    e = make_expert(30)
    out = merge_svd([e], [1.0], rank=rank)
    for role in ("gate", "up", "down"):
        sigma = torch.linalg.svdvals(e[role])
        err2 = (e[role] - out[role]).pow(2).sum()
        torch.testing.assert_close(err2, sigma[rank:].pow(2).sum(), rtol=1e-9, atol=1e-9)
        assert torch.linalg.matrix_rank(out[role]) == rank


def test_svd_full_rank_equals_average_and_truncation_projects_it():
    group = [make_expert(s, bias=True) for s in (31, 32, 33)]
    w = [0.5, 0.3, 0.2]
    avg = merge_average(group, w, align=False)
    full = merge_svd(group, w, align=False)
    for role in group[0]:
        torch.testing.assert_close(full[role], avg[role], rtol=1e-9, atol=1e-9)
    r = 6
    low = merge_svd(group, w, rank=r, align=False)
    for role in ("gate", "up", "down"):
        # independent: top-r left singular vectors of the horizontal concatenation, projector applied to the average
        u = torch.linalg.svd(torch.cat([m[role] for m in group], dim=1), full_matrices=False).U[:, :r]
        torch.testing.assert_close(low[role], u @ (u.T @ avg[role]), rtol=1e-9, atol=1e-9)
        assert torch.linalg.matrix_rank(low[role]) == r
    torch.testing.assert_close(low["down_bias"], avg["down_bias"], rtol=0, atol=1e-12)  # biases are averaged


def test_joint_svd_factors_shapes():
    mats = [make_expert(s)["down"] for s in (34, 35)]  # [H, I]
    a, b = joint_svd_factors(mats, [1.0, 3.0], rank=4)
    assert a.shape == (H, 4) and b.shape == (4, I)
    a_full, b_full = joint_svd_factors(mats, [1.0, 3.0])
    assert a_full.shape == (H, H)  # m = min(H, 2·I)
    torch.testing.assert_close(a_full @ b_full, (mats[0] + 3 * mats[1]) / 4, rtol=1e-9, atol=1e-9)


def test_svd_rank_larger_than_possible_is_capped():
    e = make_expert(36)
    torch.testing.assert_close(merge_svd([e], [1.0], rank=10_000)["gate"], e["gate"], rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------- bad input


def _bad_groups():
    e = make_expert(40, bias=True)
    small = make_expert(41, inter=I - 8)
    yield "empty", [], [], "at least one expert"
    yield "mismatched shapes", [make_expert(42), small], [1, 1], "same shapes"
    yield "mismatched roles", [e, make_expert(43)], [1, 1], "same roles"
    yield "missing down", [{"gate": e["gate"], "up": e["up"]}], [1], "missing \\['down'\\]"
    yield "unknown role", [dict(e, w9=e["gate"])], [1], "unknown \\['w9'\\]"
    yield "down not transposed", [dict(e, down=e["down"].T.contiguous())], [1], "down has shape"
    yield "bias shape", [dict(e, gate_bias=e["down_bias"])], [1], "gate_bias has shape"
    yield "integer weights", [{k: v.long() for k, v in e.items()}], [1], "floating point"
    yield "mixed dtypes", [e, {k: v.float() for k, v in e.items()}], [1, 1], "one dtype"
    yield "negative weight", [e, dict(e)], [1.0, -0.5], ">= 0"
    yield "all-zero weights", [e, dict(e)], [0.0, 0.0], "positive sum"
    yield "nan weight", [e, dict(e)], [1.0, float("nan")], "finite"
    yield "weights count", [e, dict(e)], [1.0], "one per member"
    yield "not a dict", [e["gate"]], [1], "dict role -> tensor"


@pytest.mark.parametrize("merge", [merge_average, merge_svd])
@pytest.mark.parametrize("case", list(_bad_groups()), ids=lambda c: c[0])
def test_bad_groups_are_refused(merge, case):
    _, group, weights, match = case
    with pytest.raises(MoePruneError, match=match):
        merge(group, weights)


def test_bad_anchor_rank_and_permutation_are_refused():
    e = make_expert(44)
    for anchor in (2, -1, True, 0.5):
        with pytest.raises(MoePruneError, match="anchor"):
            merge_average([e, dict(e)], [1, 1], anchor=anchor)
        with pytest.raises(MoePruneError, match="anchor"):
            align_group([e, dict(e)], anchor=anchor)
    for rank in (0, -3, 2.5, True):
        with pytest.raises(MoePruneError, match="rank"):
            merge_svd([e], [1], rank=rank)
    for perm in (torch.zeros(I, dtype=torch.long), torch.arange(I - 1), torch.arange(I).float(),
                 torch.arange(I).reshape(2, -1)):
        with pytest.raises(MoePruneError, match="permutation"):
            permute(e, perm)
    with pytest.raises(MoePruneError, match="same shapes"):
        permutation_to(e, make_expert(45, inter=I - 8))


@pytest.mark.parametrize("n_survivors", [3, 19])  # one block, and several blocks of survivors
def test_dern_assignment_equals_one_argmax_over_every_survivor(n_survivors):
    """DERN scans survivors block by block; the reference takes one argmax of the full cosine matrix."""
    from moeprune.merge.dern import dern_assign

    g = torch.Generator().manual_seed(n_survivors)
    I, H, E = 6, 5, n_survivors + 4
    experts = [{"gate": torch.randn(I, H, generator=g), "up": torch.randn(I, H, generator=g),
                "down": torch.randn(H, I, generator=g)} for _ in range(E)]
    survivors, dropped = list(range(n_survivors)), list(range(n_survivors, E))
    got = dern_assign(experts, survivors, dropped, threshold=0.1)

    def feats(e):  # [I, 3H] unit rows, float64
        f = torch.cat([e["gate"], e["up"], e["down"].t()], dim=1).double()
        return f / f.norm(dim=1, keepdim=True)

    every = torch.cat([feats(experts[s]) for s in survivors])  # [n·I, 3H]
    for d in dropped:
        best, flat = (feats(experts[d]) @ every.T).max(dim=1)
        keep = (best >= 0.1).nonzero().squeeze(1)
        k, pos, target = got[d]
        assert torch.equal(k, keep) and torch.equal(pos, flat[keep] // I) and torch.equal(target, flat[keep] % I)
        assert k.numel() > 0


def test_dern_float32_scan_settles_near_ties_in_float64():
    """DERN scores in float32 and re-settles close rows in float64. Survivor neurons are built at cosines
    0.5 + U(0, 1e-8) to the dropped neurons: float32 cannot order them, float64 can; the assignment must still equal
    the float64 argmax."""
    from moeprune.merge.dern import dern_assign, float32_margin

    g = torch.Generator().manual_seed(7)
    I, H, n = 8, 16, 10
    D = 3 * H

    def expert(f):  # [I, 3H] neuron features -> canonical roles
        return {"gate": f[:, :H].clone(), "up": f[:, H:2 * H].clone(), "down": f[:, 2 * H:].t().clone()}

    u = torch.nn.functional.normalize(torch.randn(I, D, generator=g, dtype=torch.float64), dim=1)  # dropped
    survivors = []
    for _ in range(n):
        w = torch.randn(I, D, generator=g, dtype=torch.float64)
        w = torch.nn.functional.normalize(w - (w * u).sum(1, keepdim=True) * u, dim=1)  # ⊥ u per row
        c = 0.5 + 1e-8 * torch.rand(I, 1, generator=g, dtype=torch.float64)
        survivors.append(expert(c * u + (1 - c ** 2).sqrt() * w))
    experts = [*survivors, expert(u)]
    got = dern_assign(experts, list(range(n)), [n], threshold=0.4)

    def feats(e):  # [I, 3H] unit rows, float64
        f = torch.cat([e["gate"], e["up"], e["down"].t()], dim=1)
        return f / f.norm(dim=1, keepdim=True)

    cos = feats(experts[n]) @ torch.cat([feats(e) for e in survivors]).T  # [I, n·I]
    top2 = cos.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    assert ((gap > 1e-13) & (gap < float32_margin(D) / 100)).all()  # float64 orders them, float32 cannot
    best, flat = cos.max(dim=1)
    k, pos, target = got[n]
    assert torch.equal(k, torch.arange(I)) and torch.equal(pos, flat // I) and torch.equal(target, flat % I)

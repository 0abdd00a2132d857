"""Routing-analysis metrics: SRP/SCH (local routing consistency) and balance/specialisation, against hand-computed
values and brute-force references."""

import itertools
import math

import numpy as np
import pytest
import torch

from moeprune.analysis import (
    coactivation_counts,
    coactivation_lift,
    coefficient_of_variation,
    domain_specificity,
    lrc,
    sch,
    sch_curve,
    segment_counts,
    srp,
    srp_per_expert,
    srp_sch_baseline,
    usage_entropy,
)
from moeprune.errors import MoePruneError

# ---------------------------------------------------------------- hand-computed traces (E = 4, k = 2, T = 8)

PERFECT = torch.tensor([[0, 1]] * 8)  # every token uses {0, 1}
BLOCKS = torch.tensor([[0, 1]] * 4 + [[2, 3]] * 4)  # {0,1} ×4 then {2,3} ×4
ALTERNATING = torch.tensor([[0, 1], [2, 3]] * 4)  # {0,1}, {2,3}, {0,1}, ...


@pytest.mark.parametrize("L", [1, 2, 4, 8])
def test_perfect_locality_is_one(L):
    # Every window has f = [L, L, 0, 0]; threshold α = L picks {0, 1}: TP = P = A = 2L per window -> F1 = 1.
    assert srp(PERFECT, 4, L) == pytest.approx(1.0)
    # A 2-expert cache {0, 1} serves all 2L activations of every window.
    assert sch(PERFECT, 4, L, 2) == pytest.approx(1.0)
    # With one slot the best cache serves half of each window.
    assert sch(PERFECT, 4, L, 1) == pytest.approx(0.5)


def test_blocks_known_fractions():
    # L = 4: windows p = 0..4 have f = [4,4,0,0], [3,3,1,1], [2,2,2,2], [1,1,3,3], [0,0,4,4].
    # Histogram over the 20 (window, expert) pairs: 4 pairs at each of f = 0, 1, 2, 3, 4; A = Σ f = 40 = 5·2·4.
    # α=4: TP=16, P=4·4=16 -> 32/56 = 4/7;  α=3: TP=28, P=32 -> 56/72 = 7/9;  α=2: TP=36, P=48 -> 72/88 = 9/11;
    # α=1: TP=40, P=64 -> 80/104 = 10/13;  α=0: TP=40, P=80 -> 80/120 = 2/3.  SRP = max = 9/11.
    assert srp(BLOCKS, 4, 4) == pytest.approx(9 / 11)
    # SCH: per-window top-m sums. m=1: 4+3+2+3+4 = 16 -> 16/40; m=2: 8+6+4+6+8 = 32 -> 0.8;
    # m=3: 8+7+6+7+8 = 36 -> 0.9; m=4: 1.
    assert sch(BLOCKS, 4, 4, 2) == pytest.approx(0.8)
    assert sch_curve(BLOCKS, 4, 4).tolist() == pytest.approx([0.4, 0.8, 0.9, 1.0])
    # Expert 0 alone: f over windows = 4, 3, 2, 1, 0 (A = 10); α=2 -> TP=9, P=3·4=12 -> 18/22 = 9/11 (best).
    assert srp_per_expert(BLOCKS, 4, 4).tolist() == pytest.approx([9 / 11] * 4)


def test_alternating_known_fractions():
    # L = 2: every window has f = [1, 1, 1, 1]. α=1 (or 0): TP = 4, P = 4·2 = 8, A = 4 -> 8/12 = 2/3; α=2: 0.
    assert srp(ALTERNATING, 4, 2) == pytest.approx(2 / 3)
    # Best 2-cache covers 2 of the 4 activations of each window.
    assert sch(ALTERNATING, 4, 2, 2) == pytest.approx(0.5)


def test_several_sequences_are_pooled_not_averaged():
    # A = {0,1} ×4 and B = alternating ×4, L = 2: 3 windows each. A: f=[2,2,0,0] (6 pairs at 2, 6 at 0);
    # B: f=[1,1,1,1] (12 pairs at 1). Pooled A = 24. α=2: TP=12, P=12 -> 24/36; α=1: TP=24, P=36 -> 48/60 = 0.8;
    # α=0: 48/72. Pooled SRP = 0.8, whereas the mean of per-sequence SRPs would be (1 + 2/3)/2 = 5/6.
    a, b = PERFECT[:4], ALTERNATING[:4]
    assert srp(a, 4, 2) == pytest.approx(1.0) and srp(b, 4, 2) == pytest.approx(2 / 3)
    assert srp([a, b], 4, 2) == pytest.approx(0.8)
    # SCH m=2: A hits 4/4 in each of 3 windows, B hits 2/4: (12 + 6) / 24 = 0.75.
    assert sch([a, b], 4, 2, 2) == pytest.approx(0.75)


def test_short_sequences_contribute_no_segments():
    # A 2-token trace has no window of length 4; pooling with BLOCKS gives BLOCKS' value.
    assert srp([BLOCKS, PERFECT[:2]], 4, 4) == pytest.approx(9 / 11)


def test_segment_counts_shape_and_values():
    f = segment_counts(BLOCKS, 4, 4)  # [5, 4]
    assert f.tolist() == [[4, 4, 0, 0], [3, 3, 1, 1], [2, 2, 2, 2], [1, 1, 3, 3], [0, 0, 4, 4]]
    assert segment_counts(BLOCKS, 4, 9).shape == (0, 4)


# ---------------------------------------------------------------- brute force on random traces


def _random_trace(gen: torch.Generator, T: int, E: int, k: int, stick: float) -> torch.Tensor:
    rows = [torch.randperm(E, generator=gen)[:k]]
    for _ in range(T - 1):
        keep = torch.rand((), generator=gen) < stick
        rows.append(rows[-1] if keep else torch.randperm(E, generator=gen)[:k])
    return torch.stack(rows)


def _windows_bruteforce(traces, E, L):
    """f(e, p) by explicit loops over windows and tokens."""
    out = []
    for t in traces:
        rows = [set(r.tolist()) for r in t]
        for p in range(len(rows) - L + 1):
            out.append([sum(e in rows[i] for i in range(p, p + L)) for e in range(E)])
    return np.array(out, dtype=np.int64)  # [W, E]


def _srp_bruteforce(traces, E, L):
    """max over *every* segment router R ∈ {0,1}^{W×E} (any subset per segment) of the pooled F1."""
    f = _windows_bruteforce(traces, E, L).reshape(-1)  # [W·E]
    n = f.size
    assert n <= 16
    R = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)  # [2^n, n]
    tp = R @ f
    pred = R.sum(1) * L
    f1 = 2 * tp / np.maximum(pred + f.sum(), 1)
    return f1.max()


def _sch_bruteforce(traces, E, L, m):
    """Per window, the best of all m-subsets of experts; pooled hits / pooled activations."""
    f = _windows_bruteforce(traces, E, L)
    hits = sum(max(row[list(c)].sum() for c in itertools.combinations(range(E), m)) for row in f)
    return hits / f.sum()


@pytest.mark.parametrize("seed", range(6))
def test_srp_matches_bruteforce_over_all_segment_routers(seed):
    gen = torch.Generator().manual_seed(seed)
    E, k, L = 4, 2, 3
    trace = _random_trace(gen, T=6, E=E, k=k, stick=0.5)  # 4 windows × 4 experts = 16 binary choices
    assert srp(trace, E, L) == pytest.approx(_srp_bruteforce([trace], E, L))
    # Two sequences of different lengths (2 + 3 windows, E = 3, k = 1).
    traces = [_random_trace(gen, T=4, E=3, k=1, stick=0.4), _random_trace(gen, T=5, E=3, k=1, stick=0.4)]
    assert srp(traces, 3, 3) == pytest.approx(_srp_bruteforce(traces, 3, 3))


@pytest.mark.parametrize("seed", range(6))
def test_sch_matches_bruteforce_over_all_subsets(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    E, k = 6, 2
    traces = [_random_trace(gen, T=int(T), E=E, k=k, stick=0.6) for T in (20, 13, 7)]
    for L in (1, 3, 5):
        for m in range(1, E + 1):
            assert sch(traces, E, L, m) == pytest.approx(_sch_bruteforce(traces, E, L, m))


def test_srp_per_expert_matches_bruteforce():
    gen = torch.Generator().manual_seed(7)
    E, L = 4, 3
    trace = _random_trace(gen, T=10, E=E, k=2, stick=0.5)
    f = _windows_bruteforce([trace], E, L)  # [8, 4]
    per = srp_per_expert(trace, E, L)
    for e in range(E):
        col = f[:, e]
        R = ((np.arange(2**col.size)[:, None] >> np.arange(col.size)[None, :]) & 1).astype(np.float64)
        ref = (2 * (R @ col) / np.maximum(R.sum(1) * L + col.sum(), 1)).max()
        assert per[e].item() == pytest.approx(ref)


@pytest.mark.parametrize("cells", [1, 50, 1 << 22])  # one window per chunk, a few, all in one
def test_srp_and_sch_curve_equal_sorted_windows_chunk_by_chunk(monkeypatch, cells):
    """Longer traces than the exhaustive tests allow: SCH against each window's sorted counts, SRP against every
    threshold router R = [f ≥ α] (the optimum's form, checked exhaustively above), both by numpy on the by-loop
    windows. Lengths 30 and 41 leave the shorter traces without a window, so windows across a trace's end count."""
    monkeypatch.setattr(lrc, "CHUNK_CELLS", cells)
    gen = torch.Generator().manual_seed(21)
    E = 12
    traces = [_random_trace(gen, T=int(T), E=E, k=3, stick=0.7) for T in (41, 9, 25, 33)]
    for L in (1, 4, 9, 30, 41):
        f = _windows_bruteforce(traces, E, L)  # [W, E]
        top = np.sort(f, axis=1)[:, ::-1].cumsum(1).sum(0)  # [E]: Σ_p top-m sum
        f1 = [2 * f[f >= a].sum() / max(L * (f >= a).sum() + f.sum(), 1) for a in range(L + 2)]
        s, curve = lrc.srp_sch(traces, E, L)
        assert curve.tolist() == (top / f.sum()).tolist()
        assert s == pytest.approx(max(f1), rel=1e-15)
        assert srp(traces, E, L) == s and sch_curve(traces, E, L).tolist() == curve.tolist()


def test_length_one_segments_are_trivially_perfect():
    gen = torch.Generator().manual_seed(3)
    trace = _random_trace(gen, T=50, E=8, k=2, stick=0.0)
    assert srp(trace, 8, 1) == pytest.approx(1.0)
    assert sch(trace, 8, 1, 2) == pytest.approx(1.0)
    curve = sch_curve(trace, 8, 5)
    assert (curve[1:] >= curve[:-1]).all() and curve[-1].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- baseline


def test_baseline_is_seeded_and_below_a_local_trace():
    gen = torch.Generator().manual_seed(11)
    blocks = [torch.randperm(16, generator=gen)[:2].repeat(32, 1) for _ in range(8)]  # 8 blocks of 32 equal tokens
    trace = torch.cat(blocks)  # [256, 2]
    base = srp_sch_baseline(trace, 16, 16, 4, n_shuffles=4, seed=5)
    assert base == srp_sch_baseline(trace, 16, 16, 4, n_shuffles=4, seed=5)
    assert srp(trace, 16, 16) > base.srp + 0.2
    assert sch(trace, 16, 16, 4) > base.sch + 0.2


def test_baseline_of_perfect_locality_and_across_sequences():
    a, b = torch.tensor([[0, 1]] * 16), torch.tensor([[2, 3]] * 16)
    assert srp_sch_baseline(PERFECT, 4, 4, 2).srp == pytest.approx(1.0)
    within = srp_sch_baseline([a, b], 4, 4, 2, n_shuffles=2)
    assert within.srp == pytest.approx(1.0) and within.sch == pytest.approx(1.0)  # each sequence stays constant
    across = srp_sch_baseline([a, b], 4, 4, 2, n_shuffles=2, across_sequences=True)
    assert across.srp < 0.99 and across.sch < 0.99


# ---------------------------------------------------------------- validation of LRC inputs


@pytest.mark.parametrize(
    "call, hint",
    [
        (lambda: srp(torch.tensor([0, 1, 2]), 4, 2), r"\[T, k\]"),
        (lambda: srp(torch.zeros(2, 2, 2, dtype=torch.long), 4, 1), r"\[T, k\]"),
        (lambda: srp(torch.zeros(0, 2, dtype=torch.long), 4, 1), r"\[T, k\]"),
        (lambda: srp(BLOCKS.float(), 4, 2), r"\.long\(\)"),
        (lambda: srp(BLOCKS, 4, 0), "L must be >= 1"),
        (lambda: srp(BLOCKS, 4, 9), "L <= T"),
        (lambda: srp(BLOCKS, 3, 2), r"\[0, num_experts\)"),
        (lambda: srp(BLOCKS - 1, 4, 2), r"\[0, num_experts\)"),
        (lambda: srp(torch.tensor([[1, 1], [0, 2]]), 4, 1), "distinct"),
        (lambda: srp([], 4, 2), "non-empty"),
        (lambda: srp([BLOCKS, BLOCKS + 5], 4, 2), r"idx\[1\]"),
        (lambda: srp(BLOCKS, 0, 2), "num_experts must be >= 1"),
        (lambda: sch(BLOCKS, 4, 2, 0), "between 1 and 4"),
        (lambda: sch(BLOCKS, 4, 2, 5), "between 1 and 4"),
        (lambda: sch(BLOCKS, 4, 2.0, 2), "L must be an int"),
        (lambda: srp_sch_baseline(BLOCKS, 4, 2, 2, n_shuffles=0), "n_shuffles"),
        (lambda: segment_counts(BLOCKS, 4, -1), "L must be >= 1"),
    ],
)
def test_lrc_bad_input_raises_with_hint(call, hint):
    with pytest.raises(MoePruneError, match=hint):
        call()


# ---------------------------------------------------------------- balance


def test_usage_entropy_known_values():
    ent = usage_entropy(torch.full((8,), 5))
    assert ent.bits == pytest.approx(3.0) and ent.normalized == pytest.approx(1.0)  # uniform: log2 8
    one_hot = usage_entropy(torch.tensor([0, 0, 9, 0]))
    assert one_hot.bits == pytest.approx(0.0) and one_hot.normalized == pytest.approx(0.0)
    # p = [1/4, 1/4, 1/2]: H = 2·(1/4·2) + 1/2·1 = 1.5 bits; normalised 1.5 / log2 3.
    mixed = usage_entropy(torch.tensor([1, 1, 2]))
    assert mixed.bits == pytest.approx(1.5) and mixed.normalized == pytest.approx(1.5 / math.log2(3))
    batched = usage_entropy(torch.tensor([[1, 1, 1, 1], [0, 0, 0, 7]]))  # [N=2, E=4] -> [2]
    assert batched.bits.tolist() == pytest.approx([2.0, 0.0])


def test_coefficient_of_variation_known_values():
    assert coefficient_of_variation(torch.tensor([3, 3, 3, 3])) == pytest.approx(0.0)
    # mean 5, population std 2 -> 0.4
    assert coefficient_of_variation(torch.tensor([2, 4, 4, 4, 5, 5, 7, 9])) == pytest.approx(0.4)
    # [0,0,0,4]: mean 1, var = (1+1+1+9)/4 = 3 -> √3
    assert coefficient_of_variation(torch.tensor([0.0, 0.0, 0.0, 4.0])) == pytest.approx(math.sqrt(3))
    assert coefficient_of_variation(torch.tensor([[1, 1], [0, 2]])).tolist() == pytest.approx([0.0, 1.0])


def test_domain_specificity_cases():
    tokens = torch.tensor([100.0, 400.0])
    # expert 0: only domain 0; expert 1: rate 0.05 in both domains; expert 2: never used;
    # expert 3: rates 0.06 / 0.02 -> q = [3/4, 1/4], H = 0.811278 bits -> spec 0.188722.
    counts = torch.tensor([[10.0, 5.0, 0.0, 6.0], [0.0, 20.0, 0.0, 8.0]])  # [D=2, E=4]
    res = domain_specificity(counts, tokens)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert res.per_expert.tolist() == pytest.approx([1.0, 0.0, 0.0, 1 - h])
    assert res.owner[[0, 2, 3]].tolist() == [0, -1, 0]  # expert 1 is a tie between the domains
    # weights ∝ Σ_d rate: [0.1, 0.1, 0, 0.08] / 0.28
    assert res.layer == pytest.approx((0.1 * 1.0 + 0.08 * (1 - h)) / 0.28)
    # Scaling domain 1's token count (and its counts) by 7 changes nothing.
    scaled = domain_specificity(counts * torch.tensor([[1.0], [7.0]]), tokens * torch.tensor([1.0, 7.0]))
    assert torch.allclose(scaled.per_expert, res.per_expert) and scaled.layer == pytest.approx(res.layer)
    # Default tokens = row sums (k·tokens): proportional use still scores 0, exclusive use 1.
    # Row sums 8 and 16: rates [.375, .125, .5, 0] and [.375, .125, 0, .5].
    prop = domain_specificity(torch.tensor([[3.0, 1.0, 4.0, 0.0], [6.0, 2.0, 0.0, 8.0]]))
    assert prop.per_expert.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert prop.owner[2:].tolist() == [0, 1]
    assert prop.layer == pytest.approx(0.5)  # weights ∝ [.75, .25, .5, .5]


def test_coactivation_lift_independent_by_construction():
    # 24 tokens = {0,1} × {0,1,2} × {0,1,2,3}; expert 0 fires on x0 == 0, expert 1 on x1 == 0, expert 2 on x2 < 3:
    # independent coordinates -> P(i, j) = P(i) P(j) exactly. Expert 3 never fires.
    grid = torch.tensor(list(itertools.product(range(2), range(3), range(4))))  # [24, 3]
    mask = torch.stack([grid[:, 0] == 0, grid[:, 1] == 0, grid[:, 2] < 3, torch.zeros(24, dtype=torch.bool)], 1)
    m = mask.long()  # [24, 4]
    lift = coactivation_lift(m.T @ m, 24)
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.isnan(lift.diagonal()).all() and not torch.isnan(lift[off]).any()
    assert lift[:3, :3][off[:3, :3]].tolist() == pytest.approx([1.0] * 6)
    assert lift[3, :3].tolist() == [0.0] * 3 and lift[:3, 3].tolist() == [0.0] * 3
    assert torch.equal(coactivation_lift(m.T @ m, 24, diagonal=0.0).diagonal(), torch.zeros(4, dtype=torch.float64))


def test_coactivation_counts_and_dependent_lift():
    idx = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1]])
    c = coactivation_counts(idx, 3)
    assert c.tolist() == [[3, 2, 1], [2, 3, 1], [1, 1, 2]]
    lift = coactivation_lift(c, 4)
    # lift[0,1] = 2·4 / (3·3) = 8/9; lift[0,2] = 1·4 / (3·2) = 2/3
    assert lift[0, 1].item() == pytest.approx(8 / 9) and lift[0, 2].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "call, hint",
    [
        (lambda: usage_entropy(torch.ones(2, 2, 2)), r"\[E\] or \[N, E\]"),
        (lambda: usage_entropy(torch.tensor([1.0, -1.0])), "non-negative"),
        (lambda: usage_entropy(torch.zeros(4)), "all zero"),
        (lambda: usage_entropy(torch.ones(1)), "at least 2 experts"),
        (lambda: coefficient_of_variation(torch.zeros(3)), "all zero"),
        (lambda: domain_specificity(torch.ones(4)), r"\[D, E\]"),
        (lambda: domain_specificity(torch.ones(1, 4)), "at least 2 domains"),
        (lambda: domain_specificity(torch.ones(2, 4), torch.ones(3)), "D=2"),
        (lambda: domain_specificity(torch.tensor([[1.0, 2.0], [0.0, 0.0]])), "no tokens"),
        (lambda: coactivation_lift(torch.ones(2, 3), 5), "square"),
        (lambda: coactivation_lift(torch.tensor([[2.0, 1.0], [0.0, 2.0]]), 5), "symmetric"),
        (lambda: coactivation_lift(torch.tensor([[1.0, 2.0], [2.0, 3.0]]), 5), "diagonal"),
        (lambda: coactivation_lift(torch.eye(2) * 3, 2), "total tokens"),
        (lambda: coactivation_lift(torch.eye(2), 0), "positive"),
        (lambda: coactivation_counts(torch.tensor([[0, 5]]), 4), "num_experts"),
    ],
)
def test_balance_bad_input_raises_with_hint(call, hint):
    with pytest.raises(MoePruneError, match=hint):
        call()

"""Local routing consistency (LRC): SRP and SCH of Liang et al., "Not All Models Suit Expert Offloading: On Local
Routing Consistency of Mixture-of-Expert Models" (arXiv 2505.16056, code github.com/ljcleo/moe-lrc).

Notation. One MoE layer with E experts; a trace is the top-k expert indices of T consecutive tokens of one sequence,
``idx`` [T, k]. a_e[i] ∈ {0, 1} says whether expert e is among token i's top-k. A *segment* of length L is every
window of L consecutive tokens, p = 0 .. T−L (stride 1, overlapping, as in the paper and its code), and

    f(e, p) = Σ_{i=p}^{p+L−1} a_e[i]                 (activations of e inside segment p; 0 ≤ f ≤ L)

Over several sequences every sum below also runs over the sequences (pooled, not averaged per sequence).

SRP — Segment Routing Best Performance (the paper's F1(R^m_E) and SRP(E, m); code ``30_srp_calc.py`` and
``31_srp_refine.py``). A segment router R(e, p) ∈ {0, 1} switches expert e on or off for the *whole* segment p; any
set size per segment is allowed (0 .. E experts, chosen per segment). Scored against the true routing as one pooled
(micro) F1:

    F1(R) = 2 Σ_p Σ_e R(e,p) f(e,p) / Σ_p Σ_e [ L·R(e,p) + f(e,p) ]
    SRP(L) = max_R F1(R)

The maximiser is a single activation threshold α shared by all segments of the expert group: R(e,p) = [f(e,p) ≥ α]
(items enter the optimum in order of f/L, and a tie group is all-in or all-out because F1 is linear-fractional in
the number of tied items taken), so SRP = max_{α ∈ 0..L} F1(α) from the histogram of f. Expert group = the whole
layer (``srp``) or one expert (``srp_per_expert``, the paper's expert-level SRP with a threshold per expert).

SCH — Segment Cache Best Hit Rate (paper v1; code ``40_sch_calc.py`` of the v1 release). A cache of m experts that
is fixed for a whole segment, chosen with full lookahead over the segment, serves at best the m largest f(·, p):

    SCH(L, m) = Σ_p Σ_{top-m e} f(e, p) / Σ_p Σ_e f(e, p)        (denominator = Σ_p k·L)

Note: later paper versions (v3 abstract; code ``41_sch_calc.py``) redefine SCH as the hit rate of a per-token cache
that looks L tokens ahead; this module implements the segment-fixed v1 definition above.

Reading them. Both lie in [0, 1]; SRP(1) = 1 and SCH(1, m ≥ k) = 1 by construction, so look at long segments
(the paper uses L = 4 .. 256). High SRP / SCH at long L means consecutive tokens reuse the same experts, so expert
offloading with a small fast-memory cache (or dynamic expert loading per segment) stays cheap; the paper finds
m ≈ 2k a good cache size. Compare against ``srp_sch_baseline``: the same traces with token order shuffled, i.e. the
same expert frequencies and no locality. A model at its baseline has no local consistency to exploit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from moeprune.errors import MoePruneError

Traces = torch.Tensor | Sequence[torch.Tensor]


class LRCScores(NamedTuple):
    srp: float
    sch: float


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoePruneError(f"{name} must be an int, got {type(value).__name__}; pass a plain Python int")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise MoePruneError(f"{name} must be {bound}, got {value}; change {name}")


def _check_trace(idx: torch.Tensor, num_experts: int, where: str) -> None:
    if not isinstance(idx, torch.Tensor):
        raise MoePruneError(f"{where} must be a torch.Tensor of expert indices [T, k], got {type(idx).__name__}")
    if idx.dim() != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise MoePruneError(
            f"{where} must have shape [T, k] with T, k >= 1, got {list(idx.shape)}; "
            "pass one sequence of one layer (use a list for several sequences)"
        )
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise MoePruneError(f"{where} must hold integer expert indices, got dtype {idx.dtype}; use .long()")
    if int(idx.min()) < 0 or int(idx.max()) >= num_experts:
        raise MoePruneError(
            f"{where} holds expert indices in [{int(idx.min())}, {int(idx.max())}] but num_experts="
            f"{num_experts}; indices must lie in [0, num_experts)"
        )
    s = idx.sort(dim=1).values  # [T, k]
    if (s[:, 1:] == s[:, :-1]).any():
        raise MoePruneError(f"{where} repeats an expert within a token's row; each row must list k distinct experts")


def _as_list(idx: Traces, num_experts: int) -> list[torch.Tensor]:
    _check_int("num_experts", num_experts, 1)
    traces = [idx] if isinstance(idx, torch.Tensor) else list(idx)
    if not traces:
        raise MoePruneError("no traces given; pass a [T, k] tensor or a non-empty list of them")
    for i, t in enumerate(traces):
        _check_trace(t, num_experts, "idx" if isinstance(idx, torch.Tensor) else f"idx[{i}]")
    return traces


def segment_counts(idx: torch.Tensor, num_experts: int, seg_len: int) -> torch.Tensor:
    """f(e, p): activations of each expert in every length-L window of one trace. idx [T, k] -> [T−L+1, E] (int64).

    Returns an empty [0, E] tensor when T < L.
    """
    _check_int("num_experts", num_experts, 1)
    _check_trace(idx, num_experts, "idx")
    _check_int("L", seg_len, 1)
    return _windows(_prefix([idx], num_experts), seg_len)


class _Prefix(NamedTuple):
    """Running activation counts of traces laid end to end: csum[i, e] = Σ_{j<i} a_e[j] over the concatenation."""

    csum: torch.Tensor  # [ΣT+1, E] int32 (ΣT < 2^31)
    lengths: list[int]  # T_i of each trace, in order


def _prefix(traces: list[torch.Tensor], num_experts: int) -> _Prefix:
    flat = torch.cat(traces) if len(traces) > 1 else traces[0]  # [ΣT, k]
    csum = torch.zeros(flat.shape[0] + 1, num_experts, dtype=torch.int32)  # [ΣT+1, E]
    csum[1:].scatter_(1, flat.long(), 1)
    return _Prefix(csum.cumsum_(0), [t.shape[0] for t in traces])


def _starts(lengths: list[int], seg_len: int) -> torch.Tensor:
    """Global start positions of every length-L window lying inside one trace, trace by trace. [ΣW] int64."""
    spans, offset = [], 0
    for T in lengths:
        if T >= seg_len:
            spans.append(torch.arange(offset, offset + T - seg_len + 1))
        offset += T
    return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.int64)


def _differences(prefix: _Prefix, seg_len: int) -> torch.Tensor:
    """csum[i + L] − csum[i]: f(·, window starting at i) for every i, also those crossing a trace's end. [ΣT+1−L, E]"""
    return prefix.csum[seg_len:] - prefix.csum[:-seg_len]


def _windows(prefix: _Prefix, seg_len: int) -> torch.Tensor:
    """f(e, p) of every window inside one trace. [W, E] int64."""
    return _differences(prefix, seg_len).index_select(0, _starts(prefix.lengths, seg_len)).long()


def _pooled_counts(traces: list[torch.Tensor], num_experts: int, seg_len: int) -> torch.Tensor:
    f = _windows(_prefix(traces, num_experts), seg_len)  # [ΣW, E]
    if f.shape[0] == 0:
        longest = max(t.shape[0] for t in traces)
        raise MoePruneError(
            f"no segment of length L={seg_len} fits: the longest trace has T={longest} tokens; use L <= T"
        )
    return f


def _tail_sum(x: torch.Tensor) -> torch.Tensor:
    """out[..., α] = Σ_{c ≥ α} x[..., c]."""
    return x.flip(-1).cumsum(-1).flip(-1)


def _best_f1(hist: torch.Tensor, seg_len: int) -> torch.Tensor:
    """hist [..., L+1]: number of (segment, expert) pairs with f = c. Returns max_α F1(α) [...]."""
    c = torch.arange(seg_len + 1, dtype=torch.float64)  # [L+1]
    h = hist.double()
    tp = _tail_sum(h * c)  # [..., L+1]  true positives at threshold α
    pred = _tail_sum(h) * seg_len  # [..., L+1]  predicted activations
    act = tp[..., :1]  # [..., 1]  all true activations (α = 0)
    f1 = 2 * tp / (pred + act).clamp(min=1)
    return f1.max(-1).values


CHUNK_CELLS = 1 << 22  # windows per chunk × max(L+1, E): bounds the per-window histograms of `_histograms`


def _histograms(prefix: _Prefix, num_experts: int, seg_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two histograms SRP and SCH are read from, without sorting any window's counts.

    h[p, c] = #{e : f(e, p) = c}                     per window, c = 0 .. L  (built chunk by chunk of windows)
    n_c(p)  = #{e : f(e, p) ≥ c} = Σ_{c' ≥ c} h[p, c']
    hist[c] = Σ_p h[p, c]                            [L+1]: SRP's histogram of f
    reach[v] = #{(p, c ≥ 1) : n_c(p) = v}            [E+1]

    A window's top-m sum is Σ_{c ≥ 1} min(m, n_c(p)) (its j-th largest count v_j contributes [v_j ≥ c] for
    c = 1 .. L), so Σ_p top-m(p) = Σ_{m'=1}^{m} #{(p, c ≥ 1) : n_c(p) ≥ m'}: a tail sum of `reach`, cumulated.
    Integer counts throughout: the same numbers as sorting every window's f.
    """
    starts = _starts(prefix.lengths, seg_len)  # [W]
    if starts.numel() == 0:
        raise MoePruneError(
            f"no segment of length L={seg_len} fits: the longest trace has T={max(prefix.lengths)} tokens; "
            "use L <= T"
        )
    width = seg_len + 1
    hist = torch.zeros(width, dtype=torch.int64)
    reach = torch.zeros(num_experts + 1, dtype=torch.int64)
    every = _differences(prefix, seg_len)  # [ΣT+1−L, E] int32
    for chunk in starts.split(max(1, CHUNK_CELLS // max(width, num_experts))):
        f = every.index_select(0, chunk)  # [w, E] int32
        rows = torch.arange(f.shape[0], dtype=torch.int32).unsqueeze(1) * width  # [w, 1]; w·(L+1) ≤ CHUNK_CELLS
        h = torch.bincount((f + rows).flatten(), minlength=f.shape[0] * width).view(-1, width)  # [w, L+1]
        hist += h.sum(0)
        n = h.sum(1, keepdim=True) - h.cumsum(1)[:, :-1]  # [w, L]: n_c(p) = Σ_{c' ≥ c} h[p, c'], c = 1 .. L
        reach += torch.bincount(n.flatten(), minlength=num_experts + 1)
    return hist, reach


def _sch_from(reach: torch.Tensor) -> torch.Tensor:
    """SCH curve [E] from `reach` [E+1]: Σ_{m' ≤ m} #{n_c(p) ≥ m'} / Σ_p Σ_e f(e, p) (the last entry is that total)."""
    top = _tail_sum(reach)[1:].cumsum(0)  # [E]: Σ_p top-m sum for m = 1 .. E
    return top.double() / top[-1]


def srp(idx: Traces, num_experts: int, seg_len: int) -> float:
    """Segment Routing Best Performance of one layer: max over thresholds α of the pooled F1 (module docstring).

    idx: [T, k] trace, or a list of traces (sequences) pooled as in the paper. seg_len: L >= 1.
    """
    return srp_sch(idx, num_experts, seg_len)[0]


def srp_per_expert(idx: Traces, num_experts: int, seg_len: int) -> torch.Tensor:
    """Expert-level SRP (expert group = {e}, own threshold per expert). Returns [E] float64; 0 for unused experts."""
    traces = _as_list(idx, num_experts)
    _check_int("L", seg_len, 1)
    f = _pooled_counts(traces, num_experts, seg_len)  # [W, E]
    offset = torch.arange(num_experts) * (seg_len + 1)  # [E]
    hist = torch.bincount((f + offset).flatten(), minlength=num_experts * (seg_len + 1))
    return _best_f1(hist.view(num_experts, seg_len + 1), seg_len)  # [E]


def sch_curve(idx: Traces, num_experts: int, seg_len: int) -> torch.Tensor:
    """SCH(L, m) for every cache size m = 1 .. E. Returns [E] float64 (entry m−1), non-decreasing, last = 1."""
    return srp_sch(idx, num_experts, seg_len)[1]


def pool(idx: Traces, num_experts: int) -> _Prefix:
    """Checks the traces and lays them end to end once, for `pooled_srp_sch` at any number of segment lengths."""
    return _prefix(_as_list(idx, num_experts), num_experts)


def pooled_srp_sch(prefix: _Prefix, seg_len: int) -> tuple[float, torch.Tensor]:
    """(`srp`, `sch_curve`) of traces laid end to end by `pool`."""
    _check_int("L", seg_len, 1)
    hist, reach = _histograms(prefix, prefix.csum.shape[1], seg_len)
    return float(_best_f1(hist, seg_len)), _sch_from(reach)


def srp_sch(idx: Traces, num_experts: int, seg_len: int) -> tuple[float, torch.Tensor]:
    """(`srp`, `sch_curve`) of the same traces from one pass over their windows (each alone makes the same pass)."""
    return pooled_srp_sch(pool(idx, num_experts), seg_len)


def sch(idx: Traces, num_experts: int, seg_len: int, cache_size: int) -> float:
    """Segment Cache Best Hit Rate with an m-expert cache fixed per segment (module docstring). 1 <= m <= E."""
    _check_int("num_experts", num_experts, 1)
    _check_int("m (cache_size)", cache_size, 1, num_experts)
    return float(sch_curve(idx, num_experts, seg_len)[cache_size - 1])


def _shuffled(traces: list[torch.Tensor], gen: torch.Generator, across_sequences: bool) -> list[torch.Tensor]:
    if not across_sequences:
        return [t[torch.randperm(t.shape[0], generator=gen)] for t in traces]
    if len({t.shape[1] for t in traces}) != 1:
        raise MoePruneError("across_sequences=True needs every trace to have the same k; shuffle within sequences")
    flat = torch.cat(traces)  # [ΣT, k]
    flat = flat[torch.randperm(flat.shape[0], generator=gen)]
    return list(flat.split([t.shape[0] for t in traces]))


def srp_sch_baseline(
    idx: Traces,
    num_experts: int,
    seg_len: int,
    cache_size: int,
    n_shuffles: int = 8,
    seed: int = 0,
    across_sequences: bool = False,
) -> LRCScores:
    """Expected SRP and SCH without locality: mean over ``n_shuffles`` seeded random token orders.

    Shuffling the tokens (rows of idx) keeps every expert's frequency — within each sequence, or over all sequences
    with ``across_sequences=True`` (which also removes sequence/domain-level specialisation) — and destroys the order
    that local routing consistency is about. SRP/SCH − baseline is the part a segment cache gains from locality.
    """
    traces = _as_list(idx, num_experts)
    _check_int("L", seg_len, 1)
    _check_int("m (cache_size)", cache_size, 1, num_experts)
    _check_int("n_shuffles", n_shuffles, 1)
    gen = torch.Generator().manual_seed(seed)
    s_srp = s_sch = 0.0
    for _ in range(n_shuffles):
        shuf = _shuffled(traces, gen, across_sequences)
        s_srp += srp(shuf, num_experts, seg_len)
        s_sch += sch(shuf, num_experts, seg_len, cache_size)
    return LRCScores(srp=s_srp / n_shuffles, sch=s_sch / n_shuffles)

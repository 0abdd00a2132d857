"""Wanda scores, row-wise unstructured and N:M masks, and OWL's per-layer sparsities.

Wanda (Sun et al. 2023), for one linear map y = W x with W [out, in] and the inputs x_t of the tokens it sees:

    S_ik = |W_ik| · ‖X_k‖₂,     ‖X_k‖₂ = sqrt(Σ_t x_{t,k}²)

For a routed expert the tokens are its routed tokens only: gate/up see the block input rows routed to the expert
(`in_sq[j]` [H] of the neuron statistics), down sees the expert's activations h = glu(gate·x, up·x) on them
(`act_sq[j]` [I]). An expert no calibration token reached has ‖X‖ = 0 everywhere; its scores fall back to |W|
(magnitude pruning), which is what Wanda's score orders by when every input norm is equal.

Masks (True = kept), per output row, as Wanda compares:
    unstructured(s): each row drops its ⌊s·in⌋ lowest scores (ties broken by the lower input index dropped first)
    N:M:             in every group of M consecutive inputs of a row, the N highest scores are kept (2:4: half)

OWL (Yin et al. 2024), layer ℓ's outlier ratio over all its expert scores, D_ℓ = #{S > M·mean(S_ℓ)} / #S_ℓ, then

    r_ℓ = 2λ · (D_ℓ − min D) / (max D − min D),   s_ℓ = target − (r_ℓ − mean r)

so layers with more outliers are pruned less, the s_ℓ span 2λ (the layer with the fewest outliers at the top), and
the mean over layers is the target (equal-sized layers: the same number of weights removed as one uniform sparsity).
All D equal: s_ℓ = target. This is OWL's code; its paper's "within [S − λ, S + λ]" holds only when the D lie evenly
around their mean: one s_ℓ can lie up to 2λ(1 − 1/L) from the target, so λ is kept below min(S, 1 − S)/2.
"""

from __future__ import annotations

import numpy as np
import torch

from moeprune.sparsity.order import partition_nonneg

PATTERNS = ("unstructured", "2:4")


def wanda_scores(weight: torch.Tensor, in_sq: torch.Tensor) -> torch.Tensor:
    """weight [out, in], in_sq [in] (Σ_t x_k², float64) -> scores [out, in] float64."""
    return weight.detach().to(torch.float64).abs() * _input_norms(in_sq)[None, :]


def _input_norms(in_sq: torch.Tensor) -> torch.Tensor:
    """‖X_k‖₂ [in] float64; all ones when no token reached the expert (its scores are then the magnitudes)."""
    norm = in_sq.to(torch.float64).sqrt()  # [in]
    return norm if bool((norm > 0).any()) else torch.ones_like(norm)


def score_mass(weight: torch.Tensor, in_sq: torch.Tensor) -> tuple[float, int]:
    """(Σ_ik S_ik, #S) of `wanda_scores(weight, in_sq)` without making them: Σ_k ‖X_k‖₂ · Σ_i |W_ik| in float64 (a
    [in] vector instead of an [out, in] float64 matrix; equal up to the float64 summation order). A CPU weight of
    at most float32's precision (bf16, fp16, fp32) is summed from its float32 magnitudes, exact copies of its values,
    by numpy's float64 reduction: one thread, bf16 gate / up / down of 16 experts, 0.58 → 0.45 ms per matrix."""
    w = weight.detach()
    if w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16, torch.float32):
        cols = torch.from_numpy(np.add.reduce(w.to(torch.float32, copy=True).abs_().numpy(), axis=0,
                                              dtype=np.float64))  # [in] Σ_i |W_ik|
    else:
        cols = torch.sum(w.abs(), dim=0, dtype=torch.float64)  # [in]
    return float(cols @ _input_norms(in_sq)), weight.numel()


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """[out, in] -> keep [out, in] bool: each row drops its ⌊sparsity·in⌋ = d lowest scores, ties at the cut dropped
    lowest input index first (what a stable ascending sort's first d give), without sorting:

        τ_i  = the d-th smallest score of row i (a selection, not a sort)
        drop = {k : S_ik < τ_i}  ∪  the first d − #{S_ik < τ_i} positions k (by index) with S_ik = τ_i

    (3× faster than the stable sort on [448, 1024] rows; the same masks). τ comes from numpy's introselect on the
    CPU (`np.partition`: 11.5 ms on [896, 1 024] float64, `torch.kthvalue` 14–19 ms; the same values), and the
    running count of ties is taken only in the rows that hold more ties than they drop (usually none)."""
    out, n_in = scores.shape
    drop = int(sparsity * n_in)
    if not drop:
        return torch.ones(out, n_in, dtype=torch.bool, device=scores.device)
    cut = _kth_smallest(scores, drop)  # [out, 1] τ
    below = scores < cut  # [out, in]
    tie = scores == cut
    need = drop - below.sum(dim=1, keepdim=True)  # [out, 1] ties to drop (>= 1)
    extra = (tie.sum(dim=1, keepdim=True) > need).view(-1)  # [out] rows where only some ties are dropped
    if bool(extra.any()):
        rows = tie[extra]
        tie[extra] = rows & (rows.cumsum(dim=1) <= need[extra])
    return ~(below | tie)


def _kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[out, in] -> [out, 1]: the k-th smallest value of every row (k ≥ 1)."""
    if scores.device.type == "cpu" and not scores.requires_grad:
        part = np.partition(scores.numpy(), k - 1, axis=1)[:, k - 1 : k]  # [out, 1]
        return torch.from_numpy(np.ascontiguousarray(part)).to(scores.dtype)
    return torch.kthvalue(scores, k, dim=1, keepdim=True).values


BAND = 2.0 ** -18  # relative half-width of the exact band around the float32 cut (float32 scores are within ~3·2^-24)
NORMAL = 2.0 ** -100  # a cut this small or smaller (or an overflow) takes the float64 path


def wanda_mask(weight: torch.Tensor, in_sq: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """keep [out, in] = `mask_for(wanda_scores(weight, in_sq), pattern, sparsity)`, the same mask. Unstructured on
    the CPU goes through float32 first (its selection costs half of float64's) and settles the cut exactly:

        S32 = float32 scores,  τ = the d-th smallest S32 of each row
        below = {S32 < τ(1 − BAND)}     all dropped: each S is below the row's true d-th smallest score
        band  = {τ(1 − BAND) ≤ S32 ≤ τ(1 + BAND)}   its d − #below lowest by the float64 score, ties by lower input
                                                    index, are dropped: they are the d − #below lowest of the rest

    (the float32 products are within 3·2^-24 of the float64 scores, so BAND = 2^-18 separates them; a matrix with a
    row whose τ is tiny or not finite takes the float64 path; scores that overflow above τ stay above it).
    A row with #{S32 ≤ τ(1 + BAND)} = d drops exactly that set (its band is no larger than what it drops: nothing
    to order), so only the rows with more are settled in float64: most rows' band is τ alone, though in bf16
    matrices of the benchmark's shape one to a few rows per matrix hold another score within the band.
    One thread, bf16 weights: [448, 1 024] 11.1 → 5.1 ms, [1 024, 448] 5.4 → 2.6 ms; settling only the rows that
    need it, 1.94 → 1.34 ms per matrix of 16 experts' gate, up and down (old and new alternated; the same masks).
    A weight that requires grad (a model's Parameter) takes this path too: it is read detached, and a mask has no
    gradient."""
    if pattern != "unstructured" or weight.device.type != "cpu":
        return mask_for(wanda_scores(weight, in_sq), pattern, sparsity)
    out, n_in = weight.shape
    drop = int(sparsity * n_in)
    if not drop:
        return torch.ones(out, n_in, dtype=torch.bool)
    norms = _input_norms(in_sq)  # [in] float64
    w = weight.detach()
    s32 = _scores32(w, norms)  # [out, in]
    tau = _kth_smallest32(s32, drop - 1)  # [out, 1]
    if not (bool(np.isfinite(tau).all()) and float(tau.min()) >= NORMAL):  # an overflow above τ is just above
        return unstructured_mask(wanda_scores(weight, in_sq), sparsity)
    upto = s32 <= tau * (1 + BAND)  # [out, in] (numpy: its comparisons and counts are ~10× torch's here)
    keep = ~upto
    if np.count_nonzero(upto) > out * drop:  # some row holds more than it drops (each holds at least d): which
        more = np.flatnonzero(upto.view(np.uint8).sum(axis=1, dtype=np.int64) > drop)  # rows whose band is ordered
        keep[more] = _settled(w[torch.from_numpy(more)], norms, s32[more], tau[more], drop)
    return torch.from_numpy(keep)


def _settled(w: torch.Tensor, norms: torch.Tensor, s32: np.ndarray, tau: np.ndarray, drop: int) -> np.ndarray:
    """keep [r, in] of rows whose float32 band holds more than they drop (`wanda_mask`): below the band all
    dropped, then the d − #below lowest of the band by float64 score, ties by the lower input index."""
    out = s32.shape[0]
    below = s32 < tau * (1 - BAND)  # [r, in]
    need = drop - below.view(np.uint8).sum(axis=1, dtype=np.int64)  # [r] >= 1
    rows, cols, exact = _band(w, norms, ~below & (s32 <= tau * (1 + BAND)))  # row-major
    order = torch.from_numpy(np.lexsort((cols.numpy(), exact.numpy(), rows.numpy())))  # by row, score, index
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=out)
    rank = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]  # place within its row
    chosen = (rank < torch.from_numpy(need)[rows]).numpy()
    below[rows.numpy()[chosen], cols.numpy()[chosen]] = True
    return ~below


def _kth_smallest32(s32: np.ndarray, k: int) -> np.ndarray:
    """[out, in] float32 scores (≥ 0 or NaN: |w|·‖X‖) -> [out, 1] float32, the (k+1)-th smallest of each row, as
    `np.partition(s32, k, axis=1)[:, k:k+1]` gives it (on the bits: `sparsity/order.py`)."""
    return partition_nonneg(s32, k, axis=1)[:, k : k + 1]  # of a partitioned copy


def _band(w: torch.Tensor, norms: torch.Tensor, band: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, float64 scores |w|·norms) of the True entries of a C-contiguous [out, in] mask, row-major: the
    entries the float32 cuts settle exactly. Through the flat view (`np.nonzero` on the 2-D array is ~40× slower)."""
    return _exact_at(w, norms, np.flatnonzero(band), band.shape[1])


def _exact_at(w: torch.Tensor, norms: torch.Tensor, flat: np.ndarray,
              width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, float64 scores |w|·norms) at the flat indices `flat` of a row-major [out, width] matrix."""
    at = torch.from_numpy(flat)
    rows, cols = at // width, at % width
    return rows, cols, w[rows, cols].double().abs() * norms[cols]


def _scores32(w: torch.Tensor, norms: torch.Tensor) -> np.ndarray:
    """w [out, in] (detached, CPU), norms [in] float64 -> |w|·norms in float32 [out, in] (numpy, a fresh array)."""
    return w.to(torch.float32, copy=True).abs_().mul_(norms.float()).numpy()  # in place: no second fresh buffer


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """[out, in] -> keep [out, in] bool: the n highest of every m consecutive inputs per row (in % m == 0)."""
    out, n_in = scores.shape
    if n_in % m:
        raise ValueError(f"{n}:{m} sparsity needs an input width divisible by {m}; this one is {n_in}")
    groups = scores.reshape(out, n_in // m, m)  # [out, G, m]
    # highest n; on ties the lower index is kept (stable sort of the negated scores)
    top = torch.sort(-groups, dim=2, stable=True).indices[:, :, :n]  # [out, G, n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True)
    return keep.reshape(out, n_in)


def mask_for(scores: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    if pattern == "2:4":
        return n_m_mask(scores, 2, 4)
    return unstructured_mask(scores, sparsity)


def outlier_count(weight: torch.Tensor, in_sq: torch.Tensor, threshold: float) -> int:
    """#{S_ik > θ} of `wanda_scores(weight, in_sq)` (θ = `threshold`), counted as `wanda_mask` cuts: in float32, with
    the scores near θ settled in float64,

        near  = {S32 ≥ θ(1 − BAND)}                    few: OWL's θ is M × the mean, M > 1
        above = {S32 > θ(1 + BAND)} ⊂ near            all counted: each S > θ
        band  = near − above                          counted where their float64 score S > θ

    θ below NORMAL, or θ(1 + BAND) beyond float32's range, takes the float64 path. One thread, bf16 [448, 1 024]:
    the float64 scores' count took 2.0 ms, this 0.3 ms (the same counts); one pass for the band instead of three,
    0.61 → 0.52 ms per matrix of 16 experts' gate, up and down (M = 5)."""
    norms = _input_norms(in_sq)  # [in] float64
    hi = threshold * (1 + BAND)
    if weight.device.type != "cpu" or not (NORMAL <= threshold and hi < float(torch.finfo(torch.float32).max)):
        return int((wanda_scores(weight, in_sq) > threshold).sum())
    w = weight.detach()
    s32 = _scores32(w, norms)  # [out, in]
    near = np.flatnonzero(s32 >= np.float32(threshold * (1 - BAND)))  # flat indices
    high = s32.ravel()[near] > np.float32(hi)
    _, _, exact = _exact_at(w, norms, near[~high], s32.shape[1])
    return int(np.count_nonzero(high)) + int(torch.count_nonzero(exact > threshold))


def owl_sparsities(ratios: dict[int, float], target: float, lam: float) -> dict[int, float]:
    """{layer: D_ℓ} -> {layer: s_ℓ} (module docstring); clipped into [0, 1)."""
    d = torch.tensor([ratios[k] for k in sorted(ratios)], dtype=torch.float64)
    span = float(d.max() - d.min()) if len(d) else 0.0
    r = torch.zeros_like(d) if span == 0 else 2 * lam * (d - d.min()) / span
    s = target - (r - r.mean())
    return {k: float(min(max(v, 0.0), 0.99)) for k, v in zip(sorted(ratios), s.tolist(), strict=True)}

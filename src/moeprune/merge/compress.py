"""MC-SMoE's "compress" step: each merged expert matrix W [m, n] becomes low rank + sparse, W ≈ L + S.

    L = U_r Σ_r V_rᵀ          (rank r: the best rank-r approximation of what S does not hold, by SVD)
    S = H_q(W − L)            (hard threshold: the q = ⌈(1 − sparsity)·m·n⌉ entries of largest |W − L|, else 0)

fitted by alternating projections from S = 0 (GoDec; `iterations` rounds): L ← SVD_r(W − S), S ← H_q(W − L).
One round is the direct reference "SVD, then threshold the residual"; each further round cannot increase
‖W − L − S‖_F (each step is the exact minimiser over its factor with the other fixed).

Stored factorised, the pair costs r·(m + n) values for U_r Σ_r and V_r plus q values and an m·n-bit mask for S,
against m·n values dense: `factorised_bytes`. Stock transformers has no expert class that holds factors, so the
export writes the dense reconstruction L + S (same shapes and config; docs/sparsity.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moeprune.sparsity.order import partition_nonneg


def kept_entries(numel: int, sparsity: float) -> int:
    """q = ⌈(1 − sparsity)·numel⌉ (less a rounding hair, so 0.9 of 100 entries keeps 10, not 11)."""
    return max(0, math.ceil((1 - sparsity) * numel - 1e-9))


def fit_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype the fits compute in: float32 for a 16-bit W, whose own rounding (2^-9 relative for bf16, 2^-12 for
    fp16) is 2^15 or more times float32's and which the export stores rounded again to its dtype; else float64."""
    return torch.float32 if w.element_size() <= 2 else torch.float64


def low_rank(w: torch.Tensor, rank: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The best rank-`rank` approximation of w [m, n] (Eckart–Young), in `dtype` (default `fit_dtype(w)`): the
    projection onto the top-`rank` eigenvectors of the Gram matrix of its shorter side,

        W Wᵀ = U Σ² Uᵀ  ->  L = U_r (U_rᵀ W)   (m ≤ n),      WᵀW = V Σ² Vᵀ  ->  L = (W V_r) V_rᵀ   (m > n),

    which is U_r Σ_r V_rᵀ of the SVD wherever σ_r > σ_{r+1} (the subspace is then unique; its error through the Gram
    is ~ε·σ_1²/(σ_r² − σ_{r+1}²)). An expert matrix of the benchmark checkpoint ([448, 1 024], one thread): 105 ms
    by a full SVD, 33 ms this way; on the CPU only the top r eigenvectors are computed (LAPACK's MRRR `syevr` through
    scipy: the Gram's eigensolve 16.5 -> 12 ms at r = 32 of 448; in float32 for a bf16 W, 6.3 ms)."""
    wd = w.to(dtype or fit_dtype(w))
    m, n = wd.shape
    r = min(rank, m, n)
    if r == min(m, n):
        return wd.clone()
    if m <= n:
        u = _top_eigenvectors(wd @ wd.T, r)  # [m, r]
        return u @ (u.T @ wd)
    v = _top_eigenvectors(wd.T @ wd, r)  # [n, r]
    return (wd @ v) @ v.T


def _top_eigenvectors(gram: torch.Tensor, r: int) -> torch.Tensor:
    """[d, d] symmetric -> [d, r] eigenvectors of its r largest eigenvalues (ascending, as `eigh`'s last r)."""
    d = gram.shape[0]
    if gram.device.type != "cpu":
        return torch.linalg.eigh(gram).eigenvectors[:, d - r:]
    from scipy.linalg import eigh  # imported here: scipy costs every CLI start-up ~0.5 s

    _, vectors = eigh(gram.numpy(), subset_by_index=[d - r, d - 1], driver="evr", check_finite=False)
    return torch.from_numpy(vectors)


def hard_threshold(r: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` entries of largest |r| (lower flat index first on ties), the others +0.0: every entry above the
    keep-th largest magnitude t (a selection, linear time), then the first entries equal to t (a stable sort of all
    entries gave the same set 4× slower: 65 vs 15 ms on 458 k entries). On the CPU the selection and masking run in
    numpy (`np.partition`, `np.where`): 18.8 → 4.5 ms on [448, 1 024] float64, one thread (torch's `kthvalue`
    and `where` took 9.9 and 5.9 ms of it)."""
    flat = r.reshape(-1)
    if keep <= 0:
        return torch.zeros_like(r)
    if keep >= flat.numel():
        return r.clone()
    if flat.device.type == "cpu":
        f = flat.detach().numpy()  # [m·n]
        mag = np.abs(f)
        t = partition_nonneg(mag, mag.size - keep)[mag.size - keep]  # the keep-th largest |r|
        mask = mag > t
        mask[np.flatnonzero(mag == t)[: keep - int(np.count_nonzero(mask))]] = True  # ties: lower flat index first
        return torch.from_numpy(np.where(mask, f, f.dtype.type(0))).reshape(r.shape)
    mag = flat.abs()
    t = torch.kthvalue(mag, flat.numel() - keep + 1).values  # the keep-th largest |r|
    mask = mag > t
    ties = (mag == t).nonzero().view(-1)[: keep - int(mask.sum())]  # lower flat index first
    mask[ties] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(r.shape)


def low_rank_sparse(w: torch.Tensor, rank: int, sparsity: float, iterations: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, S) with W ≈ L + S (module docstring), in `fit_dtype(w)`."""
    keep = kept_entries(w.numel(), sparsity)
    wd = w.to(fit_dtype(w))
    s = torch.zeros_like(wd)
    low = wd
    for _ in range(max(1, iterations)):
        low = low_rank(wd - s, rank, wd.dtype)
        s = hard_threshold(wd - low, keep)
    return low, s


def squared_norms(w: torch.Tensor, fit: torch.Tensor) -> tuple[float, float]:
    """(‖W − F‖²_F, ‖W‖²_F) of w [m, n] and its fit F = L + S (in `fit_dtype(w)`, which holds W exactly): the
    difference taken in the fit's dtype, the squares summed in float64. On the CPU by numpy's float64 reduction: of
    a bf16 [448, 1 024] matrix's fit and error (one thread), the float64 copies of W and of the residual took about
    2 ms more than this."""
    wf = w.detach().to(fit.dtype).reshape(-1)  # [m·n]
    res = wf - fit.reshape(-1)
    if res.device.type == "cpu":
        return tuple(float(np.add.reduce(np.square(t.numpy()), dtype=np.float64)) for t in (res, wf))
    return float(torch.sum(res.double() ** 2)), float(torch.sum(wf.double() ** 2))


def factorised_bytes(shape: tuple[int, int], rank: int, sparsity: float, value_bytes: int) -> int:
    """Bytes of the factorised form: r·(m + n) values, the kept sparse values and an m·n-bit mask."""
    m, n = shape
    r = min(rank, m, n)
    keep = kept_entries(m * n, sparsity)
    return (r * (m + n) + keep) * value_bytes + -(-m * n // 8)

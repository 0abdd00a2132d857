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

import torch


def kept_entries(numel: int, sparsity: float) -> int:
    """q = ⌈(1 − sparsity)·numel⌉ (less a rounding hair, so 0.9 of 100 entries keeps 10, not 11)."""
    return max(0, math.ceil((1 - sparsity) * numel - 1e-9))


def low_rank(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of w [m, n] (float64 SVD)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]) @ vh[:r]


def hard_threshold(r: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` entries of largest |r| (lower flat index first on ties), the others 0."""
    if keep <= 0:
        return torch.zeros_like(r)
    flat = r.reshape(-1)
    order = torch.sort(-flat.abs(), stable=True).indices[:keep]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(r.shape)


def low_rank_sparse(w: torch.Tensor, rank: int, sparsity: float, iterations: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, S) float64 with W ≈ L + S (module docstring)."""
    keep = kept_entries(w.numel(), sparsity)
    wd = w.double()
    s = torch.zeros_like(wd)
    low = wd
    for _ in range(max(1, iterations)):
        low = low_rank(wd - s, rank)
        s = hard_threshold(wd - low, keep)
    return low, s


def factorised_bytes(shape: tuple[int, int], rank: int, sparsity: float, value_bytes: int) -> int:
    """Bytes of the factorised form: r·(m + n) values, the kept sparse values and an m·n-bit mask."""
    m, n = shape
    r = min(rank, m, n)
    keep = kept_entries(m * n, sparsity)
    return (r * (m + n) + keep) * value_bytes + -(-m * n // 8)

"""Least-squares solvers of the repairs (float64, damped).

Ridge least squares for a linear map W' [H, n] from inputs h_t [n] to targets d_t [H] with token weights ω_t:

    W' = argmin Σ_t ω_t ‖d_t − W' h_t‖² + λ‖W'‖²  =  A (G + λ I)⁻¹,
    A = Σ_t ω_t d_t h_tᵀ [H, n],  G = Σ_t ω_t h_t h_tᵀ,
    λ = damp · mean(diag G)   (relative damping, as GPTQ/SparseGPT; λ = 0 when G is 0).

OBS / least-squares update for removing neurons K of an expert (keeping R) with down projection W [H, I] and Gram
G = Σ_t ω_t h_t h_tᵀ [I, I] over its routed tokens (h = the full-width activation):

    W'_R = argmin Σ_t ω_t ‖W h_t − W' h_{R,t}‖² = W G_{:,R} G_RR⁻¹ = W_R + W_K G_KR G_RR⁻¹
    (G_RR damped by λ = damp · mean(diag G), G the full-width Gram)
"""

from __future__ import annotations

import torch


def damped(G: torch.Tensor, damp: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """G + λ I with λ = damp · mean(diag(scale)), `scale` = G unless given (a tiny absolute floor keeps an all-zero
    Gram solvable)."""
    ref = G if scale is None else scale
    lam = damp * float(ref.diagonal().mean()) if ref.numel() else 0.0
    return G + max(lam, 1e-12) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def ridge(A: torch.Tensor, G: torch.Tensor, damp: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """A (G + λ I)⁻¹: A [H, n], G [n, n] (symmetric PSD) -> [H, n], float64, by Cholesky; λ from `scale` (`damped`)."""
    A, G = A.double(), G.double()
    L = torch.linalg.cholesky(damped(G, damp, scale))
    return torch.cholesky_solve(A.T, L).T  # (G+λ)⁻¹ Aᵀ, transposed: G symmetric


def obs_update(W: torch.Tensor, G: torch.Tensor, kept: list[int] | torch.Tensor, damp: float) -> torch.Tensor:
    """The down projection [H, |R|] over kept neurons R that best reproduces W [H, I] on the Gram G [I, I]:
    W G_{:,R} (G_RR + λ)⁻¹ with λ = damp · mean(diag G) over the full width (module docstring)."""
    R = torch.as_tensor(kept, dtype=torch.long)
    W, G = W.double(), G.double()
    return ridge(W @ G[:, R], G[R][:, R], damp, scale=G)

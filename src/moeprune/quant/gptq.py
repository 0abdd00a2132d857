"""GPTQ for one weight matrix (Frantar et al., 2022), with compressed-tensors' group scales (`rtn.py`).

Given W [out, in] and the Hessian of its layer-wise loss H = 2 Σ_t x_t x_tᵀ [in, in] over the inputs x_t the matrix
sees (for a routed expert: only the tokens routed to it), GPTQ quantizes the columns one at a time and pushes each
column's error onto the columns not yet quantized:

    dead columns (H_jj = 0): H_jj = 1, W[:, j] = 0
    H ← H + λ I,  λ = damp · mean(diag H)
    U = chol(H⁻¹)ᵀ (upper Cholesky factor of the inverse)
    for column j (in order, or by decreasing H_jj with act order):
        at the first column of each group: (s, z) = qparams(W[:, group])      (the weights as updated so far)
        q_j = clamp(round(W[:, j] / s + z)),  ŵ_j = (q_j − z) s
        e_j = (W[:, j] − ŵ_j) / U_jj
        W[:, k] ← W[:, k] − e_j U_jk   for every later column k
Lazy batch updates: the update of later columns is applied block by block (`block` columns at a time; within a block
column by column), which is the same arithmetic reordered. Blocks are whole groups, so a group's scale is always
computed from weights that hold every earlier column's update.

Act order (`act_order=True`, compressed-tensors' "static" act order): columns are processed by decreasing H_jj, and
every group's scale is computed up front from the weights before any update (groups stay contiguous in the original
column order, so the checkpoint needs no g_idx and loads like any grouped weight).
Arithmetic in float64; scales are stored in W's dtype (what the checkpoint holds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.quant.rtn import qparams
from moeprune.quant.scheme import QuantScheme

BLOCK = 128  # columns per lazy batch update (rounded up to whole groups)


@dataclass
class Quantized:
    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out, in/g] in W's dtype
    zero: torch.Tensor | None  # [out, in/g] int8, None when symmetric


def _qcol(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: QuantScheme
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out] int8, ŵ [out] float64) of one column with its group's scale s [out] and zero z [out], rounded in the
    scales' dtype as `rtn.quantize_with` (so with H ∝ I, GPTQ is RTN exactly); ŵ is the value the checkpoint holds."""
    x = w.to(s.dtype) / s
    if z is not None:
        x = x + z.to(s.dtype)
    q = torch.round(torch.clamp(x, scheme.qmin, scheme.qmax))
    w_hat = (q - (z.to(s.dtype) if z is not None else 0)) * s
    return q.to(torch.int8), w_hat.double()


def inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """U [in, in] upper triangular with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H) (H float64, dead columns fixed)."""
    H = H.clone()
    lam = damp * float(H.diagonal().mean())
    H.diagonal().add_(lam)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def gptq(w: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, damp: float = 0.01, act_order: bool = False,
         block: int = BLOCK) -> Quantized:
    """GPTQ of W [out, in] with Hessian H [in, in] (module docstring); W's dtype sets the scales' dtype."""
    out, inp = w.shape
    g = scheme.group_size
    scheme.check_divides(inp, f"a [{out}, {inp}] weight")
    dtype = w.dtype
    W = w.detach().double().clone()  # [out, in]
    H = H.detach().double().clone()  # [in, in]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    n_groups = inp // g
    scale = torch.empty(out, n_groups, dtype=dtype)
    zero = None if scheme.symmetric else torch.empty(out, n_groups, dtype=torch.int8)
    perm = torch.arange(inp)
    if act_order:
        s0, z0 = qparams(W.to(dtype), scheme)  # [out, in/g]: every group's scale from the weights before updates
        scale.copy_(s0)
        if zero is not None:
            zero.copy_(z0)
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_factor(H, damp)
    Q = torch.empty(out, inp, dtype=torch.int8)
    block = max(g, (block // g) * g) if not act_order else block
    for i1 in range(0, inp, block):
        i2 = min(i1 + block, inp)
        W1 = W[:, i1:i2].clone()  # [out, b]
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # original column index
            grp = col // g
            if not act_order and col % g == 0:
                s, z = qparams(W1[:, i:i + g].to(dtype), scheme)  # [out, 1]
                scale[:, grp] = s[:, 0]
                if zero is not None:
                    zero[:, grp] = z[:, 0]
            q, w_hat = _qcol(W1[:, i], scale[:, grp], None if zero is None else zero[:, grp], scheme)
            Q[:, col] = q
            err = (W1[:, i] - w_hat) / U1[i, i]  # [out]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of the later columns
    return Quantized(Q, scale, zero)

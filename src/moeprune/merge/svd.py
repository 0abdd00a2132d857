"""Sub-MoE joint-SVD expert merging: a shared left basis for the group, merged right factors, optional truncation.

For a group of n experts (neurons aligned to the anchor first, as in `average`) and each projection matrix role
(gate, up: [I, H], out = I;  down: [H, I], out = H), with W_i [out, in]:

    C = [W_1 | W_2 | … | W_n]                         [out, n·in]   horizontal concatenation
    C = U S Vᵀ  (thin SVD, float64)                   U [out, m], S [m], V [n·in, m],  m = min(out, n·in)
    V_i = rows i·in … (i+1)·in − 1 of V               [in, m]       so W_i = U S V_iᵀ exactly
    V̄  = Σ_i f_i V_i / Σ_i f_i                        [in, m]       frequency-weighted right factors
    W  = U_r S_r V̄_rᵀ                                 [out, in]     first r = rank singular triplets

U is the group's shared output basis (the left singular vectors of C span the union of the members' column
spaces, ordered by how much of the group's energy they carry); each member keeps its own coefficients V_i, and the
merge averages only those coefficients. Biases (which are not factorised) are frequency-averaged.

Consequences, worth knowing (and tested):
- full rank (rank=None: r = m) makes the merge linear: U S V̄ᵀ = Σ f_i U S V_iᵀ / Σ f_i = Σ f_i W_i / Σ f_i,
  i.e. exactly `merge_average`. The SVD formulation only differs through truncation: with r < m,
  W = U_r U_rᵀ · (Σ f_i W_i / Σ f_i), the average projected onto the top-r shared output subspace of the group.
  The compression of Sub-MoE comes from storing W as the factors (U_r S_r) [out, r] and V̄_rᵀ [r, in]
  (`joint_svd_factors`), which is smaller than W when r·(out + in) < out·in.
- one expert at full rank is reproduced exactly (up to float64 round-off); n identical experts give that expert
  (C = [W | … | W] has U S = the expert's own U S · √n and V_i = V_W / √n, so V̄ = V_i and U S V̄ᵀ = W).
- one expert at rank r is its best rank-r approximation (Eckart–Young): ‖W − W_r‖_F² = Σ_{k>r} σ_k².

`rank` is capped per role at m (gate/up: min(I, n·H); down: min(H, n·I)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moeprune.errors import MoePruneError
from moeprune.merge.average import prepare_group

MATRIX_ROLES = ("gate", "up", "down")


def _check_rank(rank: int | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MoePruneError(f"SVD merge rank must be a positive integer or None (full rank), got {rank!r}.")


def joint_svd_factors(mats: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor,
                      rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged matrix of one role as low-rank factors (A, B), float64, with W_merged = A @ B:
    A = U_r diag(S_r) [out, r], B = V̄_rᵀ [r, in] (see the module docstring). `mats`: n aligned [out, in] matrices.
    `weights` are used as given (normalised here), so they need not sum to 1."""
    _check_rank(rank)
    if len(mats) == 0:
        raise MoePruneError("joint SVD needs at least one matrix.")
    shapes = {tuple(m.shape) for m in mats}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise MoePruneError(f"joint SVD needs n matrices of one 2-D shape, got shapes {sorted(shapes)}.")
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != len(mats) or (w < 0).any() or w.sum() <= 0:
        raise MoePruneError(f"joint SVD needs one weight >= 0 per matrix with a positive sum, got {w.tolist()}.")
    device = mats[0].device
    w = (w / w.sum()).to(device)
    out_dim, in_dim = mats[0].shape
    concat = torch.cat([m.detach().to(device, torch.float64) for m in mats], dim=1)  # [out, n·in]
    u, s, vh = torch.linalg.svd(concat, full_matrices=False)  # u [out, m], s [m], vh [m, n·in]
    m = s.numel()
    r = m if rank is None else min(rank, m)
    v_blocks = vh.t().reshape(len(mats), in_dim, m)  # [n, in, m]: block i = V_i
    v_merged = torch.einsum("n,nim->im", w, v_blocks)  # [in, m]
    a = u[:, :r] * s[:r]  # [out, r]
    b = v_merged[:, :r].t()  # [r, in]
    return a, b


def merge_svd(experts: list[Mapping[str, torch.Tensor]], weights: Sequence[float] | torch.Tensor,
              rank: int | None = None, align: bool = True, anchor: int | None = None) -> dict[str, torch.Tensor]:
    """One expert from a group by Sub-MoE joint SVD (module docstring), returned dense in the inputs' dtype.

    experts/weights/anchor/align as in `merge_average` (members aligned to the anchor, default the largest
    weight). rank: number of shared singular directions kept per role (None: full rank, capped at
    min(out, n·in) per role). With one expert at full rank it reproduces the expert exactly; with identical
    experts it reproduces them; at full rank it equals `merge_average` (the merge is linear in V_i).
    """
    _check_rank(rank)
    members, w, anchor = prepare_group(experts, weights, anchor, align)
    ref = experts[anchor]
    out: dict[str, torch.Tensor] = {}
    for role in ref:
        device = ref[role].device
        if role in MATRIX_ROLES:
            a, b = joint_svd_factors([m[role].to(device) for m in members], w, rank)
            merged = a @ b  # [out, in]
        else:  # biases: frequency average
            merged = sum(wi * m[role].detach().to(device, torch.float64) for wi, m in zip(w.tolist(), members,
                                                                                           strict=True))
        out[role] = merged.to(ref[role].dtype)
    return out

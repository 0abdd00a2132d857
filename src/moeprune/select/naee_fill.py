"""Each token's candidate slots filled when a route first reaches them, not all up front (NAEE precompute).

The candidates (`naee_candidates.py`) bound where a route can go under any |D| ≤ d: C = k·(⌈d/k⌉ + 2) slots per
token. What a search reaches is far less: token t's route under D ends at slot k + |D ∩ its first choices| − 1, and
the sets a search scores hold experts that few tokens rank high. Measured with beam 4 at 25 % (the largest slot any
scored route used, over 2 048 tokens per layer): the big-model checkpoint (E = 128, k = 8, d = 32, C = 48) ≤ 11;
a random 128-expert top-8 model ≤ 16 for all tokens but one; a random 32-expert top-4 model (C = 16) ≤ 8 for 97 %.
So the precompute fills each token's first F = min(C, `INITIAL_ROUNDS`·k) slots: y_j(t) for those j, G_t[:F, :F],
A_t[:F]. The evaluator, before it reads a route's entries, fills what the route reaches beyond (`grow_targets`):
token t, filled up to f_t, whose routes need slot s gets

    n_t = min(C, max(k·⌈(s + 1) / k⌉, 2·f_t))      (whole rounds of k, at least doubling: ≤ log2(C/F) + 1 fills)

by recomputing its y for slots [0, n_t) (y is not kept: T·C·H values) and writing G_t[f:n, :n], G_t[:f, f:n] and
A_t[f:n] only. The block already filled, which earlier scores read, is never rewritten: a score never mixes two
roundings of one product. Kept for this per token: U_t [H] float64 and f_t; unfilled entries hold NaN, so a read
that skipped the fill could not pass unseen. Expert rows: T·F + Σ over filled tokens of n_t, instead of T·C.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.select.naee_candidates import candidate_outputs

INITIAL_ROUNDS = 2  # rounds of k slots each token is filled with by the precompute
GRAM_TOKENS = 2  # tokens per float64 Gram product (their float64 outputs stay in cache)


def reduce_gram(y: torch.Tensor, u: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> None:
    """y [n, S, H] (model dtype), u [n, H] float64 -> gram [n, S, S] = ⟨y_i, y_j⟩, cross [n, S] = ⟨u, y_j⟩ (float64,
    contiguous), GRAM_TOKENS tokens at a time: their float64 copy (S·H·8 bytes each) stays in cache for both."""
    for s in range(0, y.shape[0], GRAM_TOKENS):
        yd = y[s:s + GRAM_TOKENS].double()  # [g, S, H]
        torch.bmm(yd, yd.transpose(1, 2), out=gram[s:s + GRAM_TOKENS])  # [g, S, S]
        torch.bmm(yd, u[s:s + GRAM_TOKENS, :, None], out=cross[s:s + GRAM_TOKENS, :, None])  # [g, S, 1]


def initial_fill(count: int, top_k: int) -> int:
    """F: slots each token gets from the precompute (module docstring)."""
    return min(count, INITIAL_ROUNDS * top_k)


def grow_targets(need: torch.Tensor, filled: torch.Tensor, top_k: int, count: int) -> torch.Tensor:
    """need [r] highest slot a token's routes read, filled [r] its slots filled (need ≥ filled) -> n [r] (module
    docstring)."""
    rounds = top_k * torch.div(need + top_k, top_k, rounding_mode="floor")  # k·⌈(need + 1) / k⌉
    return torch.minimum(torch.maximum(rounds, 2 * filled), torch.full_like(need, count))


@torch.no_grad()
def fill(experts: nn.Module, x: torch.Tensor, u: torch.Tensor, order: torch.Tensor, gram: torch.Tensor,
         cross: torch.Tensor, filled: torch.Tensor, tokens: torch.Tensor, upto: torch.Tensor, rows: int) -> int:
    """Fill slots [filled_t, upto_t) of each token t in `tokens` [r] of one chunk (module docstring): x [c, H] router
    inputs, u [c, H] float64 U_t, order [c, C] each token's candidates in selection order, gram [c, C, C] / cross
    [c, C] / filled [c] written in place; `rows`: tokens per expert pass (bounds y [rows, n, H]). The model's own
    experts code computes y (gate weight 1, `candidate_outputs`). Returns the expert rows computed."""
    computed = 0
    pairs = torch.stack([filled[tokens], upto], 1)  # [r, 2] (f, n) per token
    for f, n in pairs.unique(dim=0).tolist():
        if n <= f:
            continue
        group = tokens[(pairs[:, 0] == f) & (pairs[:, 1] == n)]  # [g] tokens filled from f to n
        for s in range(0, group.shape[0], rows):
            tok = group[s:s + rows]  # [m]
            y = torch.empty(tok.shape[0], n, x.shape[1], dtype=x.dtype, device=x.device)  # [m, n, H]
            candidate_outputs(experts, x[tok], order[tok, :n], y)
            g = torch.empty(tok.shape[0], n, n, dtype=torch.float64, device=x.device)  # [m, n, n]
            a = torch.empty(tok.shape[0], n, dtype=torch.float64, device=x.device)  # [m, n]
            reduce_gram(y, u[tok], g, a)
            gram[tok, f:n, :n] = g[:, f:, :]  # new rows
            gram[tok, :f, f:n] = g[:, :f, f:]  # new columns of the rows already filled
            cross[tok, f:n] = a[:, f:]
            computed += tok.shape[0] * n
        filled[group] = n
    return computed

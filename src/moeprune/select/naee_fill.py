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

Open candidates (routers whose selection masking can reorder, `RoutingSpec.local_selection` false: a group limit,
softmax with a selection bias): no C bounds where a route can go, so each token starts with its first F choices
(`naee_candidates.candidates`) in a table of capacity C, and an expert a route reaches that is not yet among its
token's candidates gets the next free slot (`assign`; the capacity doubles when a token needs more, up to E) and is
then filled as above. Before this, such routers computed every expert for every token (T·E rows).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeprune.select.naee_candidates import candidate_outputs, lookup, refuse

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
         cross: torch.Tensor, filled: torch.Tensor, tokens: torch.Tensor, upto: torch.Tensor, budget: int,
         known: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """Fill slots [filled_t, upto_t) of each token t in `tokens` [r] of one chunk (module docstring): x [c, H] router
    inputs, u [c, H] float64 U_t, order [c, C] each token's candidates in selection order, gram [c, C, C] / cross
    [c, C] / filled [c] written in place; `budget`: token slots per expert pass (y [budget / n, n, H] bounded). The
    model's own experts code computes y (gate weight 1, `candidate_outputs`), except where `known` (idx [c, k],
    y [c, k, H], the calibration pass's routed outputs) holds it. Returns the expert rows computed."""
    computed = 0
    pairs = torch.stack([filled[tokens], upto], 1)  # [r, 2] (f, n) per token
    for f, n in pairs.unique(dim=0).tolist():
        if n <= f:
            continue
        group = tokens[(pairs[:, 0] == f) & (pairs[:, 1] == n)]  # [g] tokens filled from f to n
        rows = max(1, budget // n)  # tokens per pass
        for s in range(0, group.shape[0], rows):
            tok = group[s:s + rows]  # [m]
            y = torch.empty(tok.shape[0], n, x.shape[1], dtype=x.dtype, device=x.device)  # [m, n, H]
            computed += candidate_outputs(experts, x[tok], order[tok, :n], y,
                                          None if known is None else (known[0][tok], known[1][tok]))
            g = torch.empty(tok.shape[0], n, n, dtype=torch.float64, device=x.device)  # [m, n, n]
            a = torch.empty(tok.shape[0], n, dtype=torch.float64, device=x.device)  # [m, n]
            reduce_gram(y, u[tok], g, a)
            gram[tok, f:n, :n] = g[:, f:, :]  # new rows
            gram[tok, :f, f:n] = g[:, :f, f:]  # new columns of the rows already filled
            cross[tok, f:n] = a[:, f:]
        filled[group] = n
    return computed


def every_expert_gram(experts: nn.Module, x: torch.Tensor, u: torch.Tensor, gram: torch.Tensor,
                      cross: torch.Tensor, rows: int) -> None:
    """x [c, H], u [c, H] float64 -> gram [c, E, E], cross [c, E] over every expert (gate weight 1, the model's own
    experts code, one call per expert with every token), `rows` tokens per pass (y [rows, E, H] bounded)."""
    E, H = gram.shape[1], x.shape[1]
    for s0 in range(0, x.shape[0], rows):
        h = x[s0:s0 + rows]  # [n, H]
        y = torch.empty(h.shape[0], E, H, dtype=x.dtype, device=x.device)  # [n, E, H]
        one = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
        for j in range(E):
            y[:, j] = experts(h, torch.full((h.shape[0], 1), j, device=h.device), one)  # [n, H]
        reduce_gram(y, u[s0:s0 + rows], gram[s0:s0 + rows], cross[s0:s0 + rows])


@torch.no_grad()
def ready(o: Any, chunk: int, tokens: torch.Tensor, idx: torch.Tensor, experts: nn.Module, top_k: int) -> torch.Tensor:
    """idx [r, b, k] experts routed on rows of tokens [r] of chunk `chunk` of `o` (`naee_outputs.ExpertOutputs` with
    candidates) -> their slots in G and A [r, b, k], after giving each expert a slot that is not yet one of its
    token's candidates (open candidates; refused otherwise) and filling every slot reached that is not filled (module
    docstring). Runs the experts: call it with their eager code path on."""
    s = lookup(o.slots[chunk], tokens, idx)  # [r, b, k], −1: not a candidate of the row's token
    miss = s < 0
    if bool(miss.any()):
        if not o.open:
            refuse()
        assign(o, chunk, tokens[:, None, None].expand_as(idx)[miss], idx[miss])
        s = lookup(o.slots[chunk], tokens, idx)
    filled = o.filled[chunk]  # [c]
    need = torch.full_like(filled, -1).scatter_reduce_(0, tokens, s.flatten(1).amax(1), "amax")  # [c]
    short = (need >= filled).nonzero().view(-1)  # tokens whose routes reach unfilled slots
    if short.numel():
        upto = torch.minimum(grow_targets(need[short], filled[short], top_k, o.gram[chunk].shape[1]),
                             o.assigned[chunk][short])
        o.rows_computed += fill(experts, o.x[chunk], o.target[chunk], o.order[chunk], o.gram[chunk], o.cross[chunk],
                                filled, short, upto, o.fill_slots, o.known[chunk] if o.known else None)
    return s


def assign(o: Any, chunk: int, tok: torch.Tensor, experts: torch.Tensor) -> None:
    """Give expert experts[i] the next free slot of token tok[i] (pairs may repeat), growing the chunk's capacity
    (G, A, order) to max(2·C, what is needed) ≤ E when a token runs out."""
    E = o.slots[chunk].shape[1]
    key = torch.unique(tok * E + experts)  # sorted: token-major, each pair once
    tok, experts = key // E, key % E
    first = torch.searchsorted(tok, tok)  # [m] index of each token's first new pair
    pos = o.assigned[chunk][tok] + torch.arange(tok.shape[0], device=tok.device) - first  # [m] its new slot
    cap = o.gram[chunk].shape[1]
    need = int(pos.max()) + 1
    if need > cap:
        grow(o, chunk, min(E, max(2 * cap, need)))
    o.order[chunk][tok, pos] = experts
    o.slots[chunk][tok, experts] = pos
    o.assigned[chunk].scatter_reduce_(0, tok, pos + 1, "amax")


def grow(o: Any, chunk: int, capacity: int) -> None:
    """Widen the chunk's G [c, C, C], A [c, C] (new entries NaN: unfilled) and order [c, C] (−1) to `capacity`."""
    gram, cross, order = o.gram[chunk], o.cross[chunk], o.order[chunk]
    c, cap = gram.shape[:2]
    g = torch.full((c, capacity, capacity), float("nan"), dtype=gram.dtype, device=gram.device)
    g[:, :cap, :cap] = gram
    a = torch.full((c, capacity), float("nan"), dtype=cross.dtype, device=cross.device)
    a[:, :cap] = cross
    ordered = torch.full((c, capacity), -1, dtype=order.dtype, device=order.device)
    ordered[:, :cap] = order
    o.gram[chunk], o.cross[chunk], o.order[chunk] = g, a, ordered

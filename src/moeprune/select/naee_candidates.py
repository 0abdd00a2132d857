"""The experts a token can ever be routed to during NAEE's search, so the precompute computes only theirs.

Where masking an expert never changes the order in which a router selects the others (`RoutingSpec.
local_selection`: a top-k over per-expert scores that masking does not reorder), a token routed with any dropped
set D, |D| ≤ d, selects its k experts among the first k + d of its own selection order. So with

    C = min(E, k·(⌈d / k⌉ + 2))      (d = the largest dropped set the search scores; one spare round of k)

the token's candidates cand_t [C] are its router's first C choices, read by the model's own router in ⌈C / k⌉
calls, each with the experts already chosen masked for that row (`masking.masked_row_blocks`). The precompute then
needs y_j(t) only for j ∈ cand_t: T·C expert rows instead of T·E, a Gram G_t [C, C] instead of [E, E] (T·C²·8
bytes kept instead of T·E²·8), and a slot table [T, E] (expert → its index in cand_t, −1 elsewhere) through which
every evaluation reads G and A. At E = 128, k = 8, 25 % (d = 32): C = 48, so 2.7× fewer expert rows, 7× less Gram
work and memory (and fewer still in practice: the slots are filled as routes reach them, `naee_fill.py`). The
spare round keeps ties at the boundary inside (with bf16 logits experts can tie, and top-k
breaks ties as it likes); a route that still left its candidates would be read as slot −1 and is refused
(`to_slots`), never scored wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.io.kernel_cache import ROW_BUCKET, pad_rows
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_row_blocks, row_masks
from moeprune.stats.slots import slot_outputs, uses_grouped_mm


def candidate_count(adapter: MoEAdapter, max_dropped: int | None) -> int:
    """C (module docstring): the slots per token, a bound where the selection is local, the starting capacity of open
    candidates otherwise (`naee_fill`); E when `max_dropped` is None or the router has extra classes."""
    E, routing = adapter.num_experts, adapter.routing()
    if max_dropped is None or getattr(adapter, "extra_classes", 0):
        return E
    k = routing.top_k
    return min(E, k * (-(-max_dropped // k) + 2))


@torch.no_grad()
def open_candidates(adapter: MoEAdapter) -> bool:
    """Whether a route can reach experts beyond any fixed number of its token's first choices (the selection is not
    local): candidates are then assigned as routes reach them (`naee_fill.assign`)."""
    return not adapter.routing().local_selection


def candidates(model: nn.Module, adapter: MoEAdapter, layer: int, x: torch.Tensor, count: int, router_args: tuple,
               router_kwargs: dict, router_rank: int) -> torch.Tensor:
    """x [c, H] -> [c, count] long: each token's first `count` experts in its router's selection order (module
    docstring), by the model's own router, one call per k of them."""
    router = adapter.router(adapter.block(model, layer))
    chosen = torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)  # [c, m]
    while chosen.shape[1] < count:
        masks = row_masks(adapter, (), chosen)  # [c, E + Z] -inf on each row's chosen experts
        with masked_row_blocks(model, adapter, layer, masks):
            routed = router(x[None] if router_rank == 3 else x, *router_args, **router_kwargs)
        chosen = torch.cat([chosen, routed[2].reshape(x.shape[0], -1)], dim=1)  # + the next k
    return chosen[:, :count]


def candidate_outputs(experts: nn.Module, h: torch.Tensor, cand: torch.Tensor, out: torch.Tensor,
                      known: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """h [n, H], cand [n, C] -> out [n, C, H]: y_{cand[t, s]}(t), gate weight 1, by the model's own experts code: one
    call per expert on the tokens that hold it as a candidate. `known` = (idx [n, k], y [n, k, H]): outputs already
    computed at gate weight 1 (y[t, i] = y_{idx[t, i]}(t), the calibration pass's routed slots), copied where a
    candidate is among them instead of computed. Experts that run transformers' grouped_mm kernel compute every
    remaining pair in one call of its steps (`stats/slots.slot_outputs`); other experts code is called once per
    expert on its pairs. Returns the expert rows computed."""
    todo = torch.arange(cand.numel(), device=cand.device)  # [n·C] flat (token, slot) pairs to compute
    if known is not None:
        idx, y = known
        match = cand[:, :, None] == idx[:, None, :]  # [n, C, k]
        hit = match.any(-1)  # [n, C]
        if bool(hit.any()):
            col = match.to(torch.uint8).argmax(-1)  # [n, C] the first recorded slot holding that expert
            tok = torch.arange(cand.shape[0], device=cand.device)[:, None].expand_as(cand)  # [n, C]
            out[hit] = y[tok[hit], col[hit]]  # [h, H]
            todo = (~hit).reshape(-1).nonzero().view(-1)  # [n·C − h]
    wanted = cand.reshape(-1)[todo]  # [m] the expert of each pair
    if uses_grouped_mm(experts):  # transformers' grouped kernel on every pair at once, as the calibration collector
        out.view(-1, out.shape[-1])[todo] = slot_outputs(experts, h, todo // cand.shape[1], wanted)  # [m, H]
        return int(todo.numel())
    one = torch.ones(h.shape[0] + ROW_BUCKET, 1, dtype=h.dtype, device=h.device)  # gate weight 1 (one slot each)
    order = wanted.argsort()  # pairs grouped by expert
    pairs_sorted, experts_sorted = todo[order], wanted[order]
    counts = torch.bincount(experts_sorted, minlength=1).tolist()
    start = 0
    for j, n in enumerate(counts):
        if n == 0:
            continue
        pairs = pairs_sorted[start:start + n]  # [n] flat (token, slot) indices
        start += n
        x = pad_rows(h[pairs // cand.shape[1]])  # [n', H]: the pairs' tokens, n rounded up on the CPU in bf16
        m = x.shape[0]  # (`io/kernel_cache.pad_rows`: each n would be a matmul kernel of its own)
        out.view(-1, out.shape[-1])[pairs] = experts(x, torch.full((m, 1), j, device=h.device), one[:m])[:n]  # [n, H]
    return int(todo.numel())


def slot_table(cand: torch.Tensor, num_experts: int) -> torch.Tensor:
    """cand [c, C] (−1: no expert in that slot) -> [c, E] long: slot of expert j among token t's candidates, −1
    where it is none."""
    slots = torch.full((cand.shape[0], num_experts + 1), -1, dtype=torch.long, device=cand.device)
    where = torch.where(cand >= 0, cand, num_experts)  # empty slots land in a spare column
    slots.scatter_(1, where, torch.arange(cand.shape[1], device=cand.device).expand_as(cand).contiguous())
    return slots[:, :num_experts].contiguous()


def first_unique(cand: torch.Tensor) -> torch.Tensor:
    """cand [c, F] -> [c] long: how many of each row's first entries are distinct (a router whose choices ran out
    may repeat an expert; what follows the first repeat is not a choice)."""
    c, F = cand.shape
    seen = (cand[:, :, None] == cand[:, None, :]).tril(-1).any(-1)  # [c, F] equals an earlier entry
    seen = torch.cat([seen, torch.ones(c, 1, dtype=torch.bool, device=cand.device)], 1)  # a sentinel at F
    return seen.long().argmax(1)


def lookup(slots: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """idx [r, b, k] expert indices of rows whose tokens are `tokens` [r] -> their candidate slots [r, b, k], −1
    where an expert is not a candidate of its row's token."""
    r, b, k = idx.shape
    flat = (tokens[:, None, None] * slots.shape[1] + idx).reshape(-1)
    return slots.view(-1).index_select(0, flat).view(r, b, k)


def refuse() -> None:
    raise MoePruneError("NAEE: a route selected an expert outside the token's precomputed candidates (its "
                        "router's first choices); the routing is not local as its spec says. Report it with "
                        "the model type; `--search-tokens` does not change it.")

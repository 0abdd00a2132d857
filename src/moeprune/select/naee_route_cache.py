"""A child row's p_t remembered across beam parents: most of a search's child rows route the same way again.

Where masking never reorders the router's selection (`RoutingSpec.local_selection`) and an expert's masking moves
only the routes that select it (`local_masking`), token t's route under a dropped set M is its first k candidates
(its router's own selection order, `naee_candidates`) that M does not hold: it depends only on which of the
candidates up to the k-th kept one M holds,

    key_t(M) = Σ_{s < end_t(M)} [cand_t[s] ∈ M]·2^s,   end_t(M) = 1 + the slot of the k-th candidate not in M,

and so does p_t(M) = wᵀG_t w − 2wᵀA_t (`naee_outputs`). The parents of a beam step differ in experts few tokens rank
high, and a step's parents are the last step's children, so the rows (t, D ∪ {j}) that `naee_incremental` reroutes
repeat: on the big-model checkpoint (E = 128, k = 8, 25 %, beam 4) 2 228 195 child rows of one layer's search held
16 576 distinct (t, key) pairs (99.3 % repeats; measured by hashing the keys over one search, the script not kept).
So each chunk keeps the p of every (t, key) it has routed (sorted int64 keys t + c·key_t, 16 bytes each), and only
rows whose key is new go through the router. (Since parents are scored from the parent they extend, on the tokens
its last drop moves (`naee_incremental`, `_derived`), far fewer rows are looked up; about half are new.) With
renormalised softmax routers the cached weights were rounded under another parent's mask (float32, ≤ 1e-7
relative: the same rounding `naee_incremental` already accepts); with sigmoid and top-k-then-softmax routers they
are the same numbers.

The keys cost O(n·C) once per beam parent and chunk, n its tokens scored (every token for the root, those its last
drop moves for a derived parent), and O(1) per child row (`parent_route`); keyed one [R, C] pass over the child rows
at a time, the 4-layer benchmark copy's search spent 6.8 of its 12.2 s making keys (py-spy).

A key t + c·key_t fits an int64 while key_t < 2^L, L = 62 − ⌈log2(c + 1)⌉ (`key_bits`: 50 at c = 2 048), which
holds when the route ends before slot L. A row whose route reaches slot L or beyond (`ParentRoute.own_fits` /
`child_fits`) is routed and not remembered; every other row is served as above. (Before, the cache was off
whenever C + ⌈log2(c + 1)⌉ > 62 could happen at all: at E = 128, top-8 from 37.5 % up, where C = 64 and more,
though routes end near slot 11; NAEE 50 % on the big-model checkpoint's 4-layer copy took 76.9 s, now 35.7 s.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

NO_KEY = -1  # the key of a row whose route ends at slot L or beyond (`key_bits`): never stored, never found


class ParentRoute(NamedTuple):
    """What `RouteCache.parent_route` knows of parent D's route, per token of a chunk ([c] each unless said)."""

    own: torch.Tensor  # key_t(D) (exact where own_fits)
    bits: torch.Tensor  # b_t with key_t(D ∪ {j}) = b_t + 2^{slot_t(j)} (exact where child_fits)
    selected: torch.Tensor | None  # [c, k] the experts t selects under D in selection order (None: D leaves a
    # token fewer than k candidates)
    own_fits: torch.Tensor  # bool: `own` is exact (every bit of key_t(D) below L)
    child_fits: torch.Tensor  # bool: key_t(D ∪ {j}) = bits + 2^{slot_t(j)} is exact for every j t selects under D
    end: torch.Tensor  # e_t: 1 + the slot of the k-th candidate D does not hold (C + 1: none)
    after: torch.Tensor  # u_t: the first slot ≥ e_t that D does not hold (C: none)
    ids: torch.Tensor  # the chunk's index of each token (the rows of `order` given)
    stride: int  # c, the chunk's tokens: a key is ids + stride·key_t


class RouteCache:
    """Per chunk: sorted keys [n] int64 and their p [n] float64 (module docstring); `tokens`: the largest chunk."""

    def __init__(self, chunks: int, tokens: int):
        self.keys = [torch.empty(0, dtype=torch.long) for _ in range(chunks)]
        self.values = [torch.empty(0, dtype=torch.float64) for _ in range(chunks)]
        self.hits = self.misses = 0
        self.limit = RouteCache.key_bits(tokens)

    @staticmethod
    def key_bits(tokens: int) -> int:
        """L: t + c·key_t fits an int64 for every key_t < 2^L, c = `tokens` per chunk (≥ 1 up to c = 2^61 − 1)."""
        return 62 - math.ceil(math.log2(tokens + 1))

    @staticmethod
    def parent_route(order: torch.Tensor, parent: torch.Tensor, top_k: int, limit: int = 62,
                     ids: torch.Tensor | None = None, stride: int | None = None) -> ParentRoute:
        """`ParentRoute` of parent D ([E] bool) for each token's candidates order [c, C] in selection order, once
        per parent and chunk (or rows `ids` [c] of a chunk of `stride` tokens: order holds those rows only). The
        child bits: let e = end_t(D) and u the first slot ≥ e that D does not hold (C if none). Masking j (a slot
        s_j < e that D does not hold) moves the k-th kept candidate to u, and every slot in [e, u) is held by D, so
        key_t(D ∪ {j}) = key_t(D) + 2^{s_j} + Σ_{e ≤ s < u} 2^s = b_t + 2^{s_j} with b_t = key_t(D) + 2^u − 2^e.

        Only bits below L = `limit` are kept (every shift capped at L: no int64 overflow); a key is flagged exact when
        its route keeps to them: key_t(D)'s bits are slots < e, so e ≤ L; key_t(D ∪ {j})'s are slots < u (the
        new k-th kept candidate's), so u < L, or, when D leaves t fewer than k (no move, e = C + 1), e ≤ L. (A key
        can still be below 2^L otherwise, its high slots not held: it is routed, not cached, all the same.)"""
        c, C = order.shape
        masked = parent[order]  # [c, C] candidate slots D holds
        ar = torch.arange(C, device=order.device)
        end = ((~masked).long().cumsum(1) < top_k).sum(1) + 1  # [c] 1 + slot of the k-th kept candidate (C + 1: none)
        before = ar[None, :] < end[:, None]  # [c, C] slots < e
        own = ((masked & before & (ar < limit)).long() << ar.clamp_max(limit)[None, :]).sum(1)  # [c] key_t(D)
        free_after = ~masked & ~before  # [c, C] slots ≥ e that D does not hold
        u = torch.where(free_after.any(1), free_after.long().argmax(1), torch.full_like(end, C))  # [c]
        one = torch.ones_like(end)
        full = end <= C  # [c] D leaves the token k candidates
        move = torch.where(full, (one << u.clamp_max(limit)) - (one << end.clamp_max(min(C, limit))), 0)  # [c]
        kept = ~masked & before  # [c, C] exactly k per token unless D leaves fewer
        selected = order[kept].view(c, top_k) if bool(full.all()) else None
        ids = torch.arange(c, device=order.device) if ids is None else ids
        return ParentRoute(own, own + move, selected, end <= limit, torch.where(full, u < limit, end <= limit),
                           end, u, ids, c if stride is None else stride)

    @staticmethod
    def own_keys(route: ParentRoute) -> torch.Tensor:
        """[c] int64 keys t + c·key_t(D) of every token of `route`; `NO_KEY` where `route.own_fits` is false."""
        return torch.where(route.own_fits, route.ids + route.stride * route.own, NO_KEY)

    @staticmethod
    def key(route: ParentRoute, slot_of: torch.Tensor, tokens: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
        """[R] int64 keys t + c·key_t(D ∪ {added}) of rows (tokens [R]: rows of `route`, added [R] expert each, one
        its token selects under D): `route` of D, slot_of [c, E] an expert's slot in the chunk (−1: none); rows of
        tokens without `route.child_fits` get `NO_KEY`."""
        t = route.ids[tokens]  # [R] the chunk's token index
        slot = slot_of[t, added]  # [R] the added expert's slot (its token selects it: a candidate)
        ok = route.child_fits[tokens]  # [R]; a fitting row's slot is below its key's top bit, so below L
        sub = torch.where(ok, route.bits[tokens] + (torch.ones_like(slot) << slot.clamp_max(62)), 0)  # [R] key_t
        return torch.where(ok, t + route.stride * sub, NO_KEY)

    def lookup(self, chunk: int, keys: torch.Tensor, count: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(found [R] bool, p [R] float64, valid where found); `count`: add to the child rows' hits and misses."""
        known, vals = self.keys[chunk].to(keys.device), self.values[chunk].to(keys.device)
        if known.numel() == 0:
            found, got = torch.zeros_like(keys, dtype=torch.bool), torch.zeros(keys.shape, dtype=torch.float64,
                                                                              device=keys.device)
        else:
            pos = torch.searchsorted(known, keys).clamp_max(known.numel() - 1)
            found, got = known[pos] == keys, vals[pos]
        if count:
            hits = int(found.sum())
            self.hits, self.misses = self.hits + hits, self.misses + keys.numel() - hits
        return found, got

    def insert(self, chunk: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Remember p of rows whose keys were not found (distinct among themselves); `NO_KEY` rows are skipped."""
        real = keys != NO_KEY
        new, order = keys[real].sort()  # [m]
        known = self.keys[chunk].to(keys.device)  # [n] sorted, none of them in `new`
        at = torch.searchsorted(known, new) + torch.arange(new.numel(), device=keys.device)  # new keys' places
        rest = torch.ones(known.numel() + new.numel(), dtype=torch.bool, device=keys.device)
        rest[at] = False  # the known keys fill the other places in their order: a merge, not a sort of n + m
        both, vals = known.new_empty(rest.shape), torch.empty(rest.shape, dtype=values.dtype, device=keys.device)
        both[at], both[rest] = new, known
        vals[at], vals[rest] = values[real][order], self.values[chunk].to(values.device)
        self.keys[chunk], self.values[chunk] = both, vals

"""NAEE's beam-search children scored from their parent, on the tokens whose route the new drop changes.

A beam step extends each kept set D by every droppable expert j. With p_t(D) = wᵀ G_t w − 2 wᵀ A_t, (i, w) the
route of token t under D (`naee_outputs`: err(D) = Σ_t ‖U_t‖² + Σ_t p_t(D)), and S_D(t) the experts t selects
under D:

    err(D ∪ {j}) = err(D) + Σ_{t : j ∈ S_D(t)} [p_t(D ∪ {j}) − p_t(D)]

exact when masking an expert a token does not select leaves that token's route as it is (`RoutingSpec.
local_masking`: renormalised softmax top-k, top-k-then-softmax, sigmoid without a group limit or with one kept
group; in exact arithmetic — renormalised softmax rounds differently when another logit is masked, so the two sides
agree to the router dtype's rounding). Per parent: one router call on its T tokens (its route and p_t(D)), then
one on the Σ_j |{t : j ∈ S_D(t)}| ≤ T·k affected rows, each routed by the model's own router under its own child's mask
(`masking.row_masks`, one mask per row) on its replayed logits (`naee_replay.ReplayLinear`, rows x[index]).
Router rows per parent: T·(1 + k) instead of T·E' for its E' children (FastEvaluator.many): at E = 128, k = 8,
E' ≈ 110, ≈ 12× fewer; at E = 16, k = 2, ≈ 4×. Child rows whose route was already scored under another parent (the
same token and masked prefix, `naee_route_cache.py`) are read back instead of routed: 99 % of them on the big-model
checkpoint. So is the parent's own route: its tokens' keys under D were stored when D was scored as a child (or,
for tokens its last drop did not reach, as its own parent), so after the root a parent's p_t(D) comes from the
cache and S_D(t) from the candidate order (`RouteCache.parent_route`), and only the rows of new keys go through the
router. NAEE 25 % on the 4-layer copy of the benchmark checkpoint: 35.6 / 37.2 s -> 34.6 / 32.5 s (A/B
interleaved). In float32 (`benchmarks/naee_incremental.py`: testbed 50 %, random 32- and 128-expert models) every
layer drops the same set as the whole-set scoring; with bf16 gate weights a cached p carries another mask's
rounding (a bf16 flip of a renormalised weight), so near-equal sets may rank otherwise: on that bf16 checkpoint
layer 0 dropped 2 of 32 experts differently, its error on every token by the model's own block 2.233 -> 2.207.

With the route cache, a parent is scored from the parent it extends (`_derived`): D = D' ∪ {a}, D' a parent of the
last step whose Σ_t p_t(D') and per-expert sums Δ_D'[j] = Σ_{t : j ∈ S_D'(t)} [p_t(D' ∪ {j}) − p_t(D')] were kept
(`Scored`). A token's terms can differ between D' and D only where a is one of its first k + 1 candidates that D'
does not hold: selected (its route changes), or the next one (the route of a child D' ∪ {j} would take it). Every
other token keeps its route, its children's routes and their cache keys, so its terms are the same numbers. So
Σ_t p_t(D) and Δ_D are D''s, minus those tokens' terms under D', plus their terms under D: ≈ T·(k + 1)/E' tokens
per parent instead of T (E = 128, k = 8, E' ≈ 110: ≈ 8 %), their rows the same cached or routed p as before, so
the errors are the whole computation's up to float64 summation order. The root, and a parent none of whose own
parents was extended, are scored from every token. NAEE 25 % on the 24-layer benchmark checkpoint: the search
17.3 -> 7.8 s (py-spy), the run × 2.27 -> × 1.98 of the plain forward (alternated, same plans;
benchmarks/RESULTS.md, session 34).

A group limit scored by top-2 sums with several kept groups (`RoutingSpec.group_reach`: DeepSeek-V3/R1) also
reroutes, for child D ∪ {j}, the tokens for which j is one of the top-2 of a kept group, read from the router's own
group choices under D (`naee_reach.py`): ≤ k + 2·topk_group rows per token and parent. Families whose routing is
neither (un-normalised softmax: Qwen2-MoE, OLMoE; softmax with a selection bias; softmax_grouped with a group
limit) are scored by `many` as before. The spec is checked at
run time once per layer, on the router itself: at the first extension, for up to `CHECK_CHILDREN` of the children,
the first chunk is routed under the child's whole mask; every token the new expert cannot reach must keep
its gate weights (sorted: with bf16 logits, experts with tied scores may swap places at the k-th, as top-k breaks
ties as it likes; the tied expert gets the same weight) within `rerouted.ULPS` units in the last place of float32,
or of the router's weight dtype when coarser (float32 renormalisation moves them by ≤ 2). Otherwise a warning names
the layer and the layer falls back to `many`. An un-normalised softmax moves every weight by the masked expert's
probability, which the check sees in float32 but not below a bf16 unit; there the spec alone decides.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeprune.log import logger
from moeprune.models.masking import masked_row_blocks, row_masks
from moeprune.select.naee_evaluator import ROW_ALIGN, FastEvaluator
from moeprune.select.naee_reach import GroupChoices, reach
from moeprune.select.naee_route_cache import RouteCache
from moeprune.select.rerouted import ULPS

CHECK_CHILDREN = 16  # children of the first extension whose routes are checked (evenly spaced)


class Scored(NamedTuple):
    """What extending parent D computed, kept for D's children when they become parents (`_derived`)."""

    total: torch.Tensor  # Σ_t p_t(D) over every chunk (float64, 0-dim)
    delta: torch.Tensor  # [E] Σ_{t : j ∈ R_D(t)} [p_t(D ∪ {j}) − p_t(D)] per expert j ∉ D (float64)
    routes: list  # per chunk: `ParentRoute` of D over its tokens (e_t, u_t read by `_derived`), or None


class IncrementalEvaluator(FastEvaluator):
    """`FastEvaluator` plus `extend(D, [j_1 … j_m])` -> errors of D ∪ {j_i} (module docstring); `many` and `__call__`
    as in `FastEvaluator`. `local`: extensions are incremental (the routing spec says it is exact and the routes
    checked at the first extension held); `checked`: that check has run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        routing = self.adapter.routing()
        self.local = routing.local_masking or routing.group_reach
        # a group limit with several kept groups: the router's own group choices widen who a child reroutes
        self.groups = None if routing.local_masking else (routing.n_group, routing.topk_group)
        self.checked = False
        # a child row's p remembered by its token's masked prefix (`naee_route_cache`): local routers with full
        # candidate orders only (a group limit's route depends on more than the prefix)
        o = self.outputs
        tokens = max(g.shape[0] for g in o.gram)
        cacheable = (self.groups is None and routing.local_selection and bool(o.slots) and not o.open
                     and RouteCache.key_bits(tokens) > 0)
        self.cache = RouteCache(len(o.gram), tokens) if cacheable else None
        self.rows_per_call = self.batch * max(x.shape[0] for x in self.xs)  # the temporaries `many` allows
        self.parents: dict[tuple[int, ...], Scored] = {}  # extended parents kept for `_derived` (cache only)
        self.derived = 0  # parents scored from a kept parent of theirs

    @torch.no_grad()
    def extend(self, parent: tuple[int, ...], additions: list[int]) -> list[float]:
        children = [tuple(sorted((*parent, j))) for j in additions]
        if not self.local or not additions:
            return self.many(children)
        if not self.checked:
            self.checked = True
            moved = self._moved(tuple(parent), list(additions))
            if moved is not None:
                logger.warning("NAEE layer %d: dropping expert %d moved the route of a token that does not select it "
                               "(%s); the router is not local as %s suggests; scoring every set whole.",
                               self.layer, moved[0], moved[1], self.adapter.routing().describe())
                self.local = False
                return self.many(children)
        return self._extend(tuple(parent), list(additions))

    @torch.no_grad()
    def _moved(self, parent: tuple[int, ...], js: list[int]) -> tuple[int, str] | None:
        """(j, what moved) for the first checked child D ∪ {j} under which a token of the first chunk that does not
        select j is routed otherwise than under D (module docstring); None: every checked route held."""
        x, c = self.xs[0], self.outputs.gram[0].shape[0]
        w, idx, reached = self._parent_route(x, c, parent, raw=True)  # [c', k] each, [c, m]
        if reached is None:
            return js[0], "the router's own group choices (its topk over groups and within each) were not seen"
        # routers compute their weights in float32 at best (a float64 model's too), bf16 ones round to bf16
        tol = ULPS * max(torch.finfo(w.dtype).eps, torch.finfo(torch.float32).eps)
        for j in js[::-(-len(js) // CHECK_CHILDREN)]:
            w2 = self._route_set(x, [*parent, j], raw=True)[0]
            rows = ~(reached == j).any(-1)  # [c] tokens whose route masking j cannot change
            # weights compared sorted: experts with tied scores may swap (top-k breaks ties as it likes; the tied
            # expert gets the same weight, as it would in the pruned model)
            a = w2[:c][rows].double().sort(-1).values  # [r, k]
            b = w[:c][rows].double().sort(-1).values  # [r, k]
            rel = float(((a - b).abs() / b.abs().clamp_min(torch.finfo(w.dtype).tiny)).max()) if rows.any() else 0.0
            if rel > tol:
                return j, f"a gate weight by {rel:.2g} relative, more than {ULPS} units in the last place"
        return None

    def _parent_route(self, x: torch.Tensor, c: int, parent: tuple[int, ...], raw: bool = False):
        """(w, idx [c', k] the route of chunk x [c', H] under `parent`, reached [c, m] the experts whose masking can
        change each of its c real tokens' route (`naee_reach.reach`); None when the router's group choices were not
        seen)."""
        if self.groups is None:
            w, idx = self._route_set(x, parent, raw)
            return w, idx, reach(idx[:c], None, self.adapter.num_experts)
        with GroupChoices(x.shape[0], *self.groups) as choices:
            w, idx = self._route_set(x, parent, raw)
        return w, idx, reach(idx[:c], choices, self.adapter.num_experts) if choices.seen else None

    def _reroute(self, i: int, x: torch.Tensor, parent: tuple[int, ...], added: torch.Tensor,
                 tok: torch.Tensor) -> torch.Tensor:
        """p_t of rows (tok [R], added [R]) of chunk i, each routed by the layer's router under D ∪ {added}
        (one mask per row), `rows_per_call` rows per call -> [R] float64."""
        out = torch.empty(tok.shape[0], dtype=torch.float64, device=tok.device)
        for r0 in range(0, tok.shape[0], self.rows_per_call):
            t, j = tok[r0:r0 + self.rows_per_call], added[r0:r0 + self.rows_per_call]  # [n]
            n = t.shape[0]
            pad = -n % ROW_ALIGN  # router calls on a multiple of ROW_ALIGN rows (`FastEvaluator`)
            index = torch.cat([t, t[-1:].expand(pad)])  # [n'] rows of x
            rows = self._buffer(n + pad)[:n + pad]
            torch.index_select(x, 0, index, out=rows)  # [n', H]
            masks = row_masks(self.adapter, parent, torch.cat([j, j[-1:].expand(pad)]))  # [n', E]
            self.replay.rows_of = (x, index)
            try:
                with self.replay, masked_row_blocks(self.model, self.adapter, self.layer, masks):
                    w2, idx2 = self._route(rows, n + pad)  # [n', k] each: each row under its child's mask
            finally:
                self.replay.rows_of = None
            out[r0:r0 + n] = self._scores(i, t, w2[:n, None], idx2[:n, None])[:, 0]
        return out

    def _extend(self, parent: tuple[int, ...], js: list[int]) -> list[float]:
        scored = self._derived(parent) if self.cache is not None else None
        if scored is None:
            scored = self._whole(parent)
        if self.cache is not None:  # kept for its children's extensions: this step's and the last step's parents
            self.parents = {D: v for D, v in self.parents.items() if len(D) >= len(parent) - 1}
            self.parents[parent] = scored
        new = torch.tensor(js, dtype=torch.long, device=scored.delta.device)
        return (scored.total + self.outputs.target_sq + scored.delta[new]).tolist()

    def _held(self, dropped) -> torch.Tensor:
        held = torch.zeros(self.adapter.num_experts, dtype=torch.bool, device=self.outputs.gram[0].device)  # [E]
        held[list(dropped)] = True
        return held

    def _whole(self, parent: tuple[int, ...]) -> Scored:
        """`Scored` of D from every token of every chunk."""
        held, o = self._held(parent), self.outputs
        total = torch.zeros((), dtype=torch.float64, device=held.device)
        delta = torch.zeros(held.shape[0], dtype=torch.float64, device=held.device)
        routes = []
        for i, x in enumerate(self.xs):
            c = o.gram[i].shape[0]
            p_sum, contrib, route = self._part(i, x, parent, held, torch.arange(c, device=held.device))
            total, delta = total + p_sum, delta + contrib
            routes.append(route)
        return Scored(total, delta, routes)

    def _derived(self, parent: tuple[int, ...]) -> Scored | None:
        """`Scored` of D = D' ∪ {a} from a kept D' (module docstring): only the tokens for which a is one of the
        first k + 1 candidates D' does not hold are scored again, under D' (subtracted) and D (added); None
        without a kept D'."""
        for a in parent:
            base = tuple(j for j in parent if j != a)
            prev = self.parents.get(base)
            if prev is not None:
                break
        else:
            return None
        o, held_d, held = self.outputs, self._held(base), self._held(parent)
        total, delta, routes = prev.total, prev.delta, []
        for i, x in enumerate(self.xs):
            was = prev.routes[i]  # D''s route, [c] each
            s = o.slots[i][:, a]  # [c] a's slot (−1: not a candidate)
            tk = ((s >= 0) & ((s < was.end) | (s == was.after))).nonzero().view(-1)  # [n] tokens a reroutes
            old_sum, old, _ = self._part(i, x, base, held_d, tk)
            new_sum, new, now = self._part(i, x, parent, held, tk)
            total, delta = total + (new_sum - old_sum), delta + (new - old)
            routes.append(was._replace(end=was.end.index_put((tk,), now.end),
                                       after=was.after.index_put((tk,), now.after)))
        self.derived += 1
        return Scored(total, delta, routes)

    def _part(self, i: int, x: torch.Tensor, parent: tuple[int, ...], held: torch.Tensor, tk: torch.Tensor):
        """(Σ_t p_t(D), [E] Σ_t [p_t(D ∪ {j}) − p_t(D)] per expert j that t's route under D can reach, the
        `ParentRoute` of tk under D or None without the cache) over tokens tk [n] of chunk i."""
        o = self.outputs
        c = o.gram[i].shape[0]
        route, found = None, None
        if self.cache is not None:  # the parent's own route: its tokens' keys were stored when D was a child
            route = RouteCache.parent_route(o.order[i][tk], held, self.k, self.cache.limit, ids=tk, stride=c)
            own_keys = RouteCache.own_keys(route)  # [n]
            found, p = self.cache.lookup(i, own_keys, count=False)
        if found is not None and route.selected is not None and bool(found.all()):
            reached = route.selected  # [n, k] = reach(idx): without group choices, the selected experts
        else:  # through the router (the root, no cache, or a route past the keys' bits)
            w, idx, reached = self._parent_route(x, c, parent)  # [c', k] each: the parent's route; [c, m]
            assert reached is not None, "checked by _moved before the first extension"
            reached = reached[tk]  # [n, m]
            p = self._scores(i, tk, w[tk, None], idx[tk, None])[:, 0]  # [n]
            if found is not None:
                self.cache.insert(i, own_keys[~found], p[~found])
        hit = (reached >= 0) & ~held[reached.clamp_min(0)]  # [n, m] an expert whose masking reroutes t
        rows, slot = hit.nonzero(as_tuple=True)  # [R] affected (token, slot) pairs, token-major
        added = reached[rows, slot]  # [R] each row's child: D ∪ {added}
        p2 = torch.empty(rows.shape[0], dtype=torch.float64, device=held.device)  # [R] p_t(D ∪ {added})
        todo = torch.arange(rows.shape[0], device=held.device)  # rows that go through the router
        if route is not None:
            keys = RouteCache.key(route, o.slots[i], rows, added)  # [R]
            found, p2 = self.cache.lookup(i, keys)
            todo = (~found).nonzero().view(-1)
        p2[todo] = self._reroute(i, x, parent, added[todo], tk[rows[todo]])
        if route is not None:
            self.cache.insert(i, keys[todo], p2[todo])
        contrib = torch.zeros(held.shape[0], dtype=torch.float64, device=held.device).index_add_(0, added,
                                                                                                p2 - p[rows])
        return p.sum(), contrib, route


def incremental_evaluator(model, adapter, layer: int, outputs, **kwargs) -> IncrementalEvaluator:
    """The evaluator NAEE's search uses (`reconstruction.search` calls `extend` per beam parent when it exists)."""
    return IncrementalEvaluator(model, adapter, layer, outputs, **kwargs)

"""NAEE reconstruction search ("Not All Experts are Equal", Lu et al. 2024): per layer, the dropped set D with

    D* = argmin_{|D| = n_drop, D ∩ P = ∅}  err(D),    err(D) = Σ_batches ‖Z − MoE_{E∖D}(X)‖_F²

over cached MoE-block inputs X and original outputs Z (P: protected experts). Group-limited routers (g groups)
only allow group-equal sets: n_drop/g experts from every group.

Search (E' = unprotected experts, d = n_drop/g per group, b = `beam`):
- exhaustive: Π_g C(E'_g, d) evaluations, exact (C(8, 2) = 28; C(16, 4) = 1 820; C(64, 16) ≈ 5·10^14 is out of
  reach); used while that count is ≤ `max_exhaustive` (default 5 000);
- beam search beyond: keep the b lowest-error partial sets (plus the plain greedy chain, so the result is never
  worse than greedy), extend each by one more droppable expert (groups already holding d are closed), n_drop
  times; children shared by two parents are evaluated once. Evaluations ≤ Σ_{i<n_drop} min(b + 1, C(E', i))·(E' − i)
  ≤ (b + 1)·n_drop·E' (in practice ≈ b·n_drop·E', the greedy chain is usually in the beam): e.g. E=128, n_drop=32,
  b=4: ≤ 18 000; E=32, n_drop=8, b=4: ≤ 1 140. b=1 is plain greedy (Σ_{i<n_drop}(E' − i) evaluations).
  Not guaranteed optimal; a width ≥ max_i C(E', i) keeps every partial set and is exhaustive.
Per evaluation (T cached real tokens, H hidden, I expert width): the block-forward reference `block_evaluator`
costs T·(2·H·E + 6·k·H·I) FLOPs plus the block's per-expert loop; NAEE's own path (`select/naee_outputs.py`,
`fast_evaluator`) precomputes every expert's output once per layer (E/k times a forward's expert work, plus the
T·E²·H float64 Gram) and then costs per token only the router's own ops after its replayed linear (softmax or
sigmoid over E, top-k, the mask) and k² gathers: measured on one CPU thread ≈ 0.4 µs per token and set at E=16
top-2, 0.7 µs at E=32 top-4, 1.8–2 µs at E=128 top-8 (two thirds of it `torch.topk`). A layer's search thus costs
≈ evaluations × T × that, and the NAEE decider keeps T ≤ `naee_outputs.DEFAULT_SEARCH_TOKENS` (2 048, measured
there): E=128, n_drop=32, b=4 ≈ 15 000 evaluations × 2 048 tokens ≈ 60 s per layer. `search` hands an evaluator
with a `.many` method every child of a beam step (and the exhaustive subsets, `EXHAUSTIVE_BATCH` at a time) in one
call; the fast evaluator scores them b at a time in one router call per chunk (same numbers; at E=128 on 4 096
tokens: 124 evaluations/s, against 56/s before with one router call and one scattered G gather per set). An
evaluator with `.extend` (`naee_incremental.IncrementalEvaluator`, what the NAEE decider uses) gets each beam parent's
new children instead and, where the routing is local (`RoutingSpec.local_masking`), scores them from the parent's
own route on the tokens that selected the newly dropped expert: T·(1 + k) router rows per parent instead of T·E'
(measured at E=128 top-8 on 2 048 tokens: ≈ 5–6 s per layer instead of 50–90 s, the same sets in float32;
`benchmarks/naee_incremental.py`).
DEFAULT_BEAM = 4, the knee of cost against quality measured on error landscapes with pairwise interactions
(E=16, n_drop=4, 40 random landscapes, brute force C(16, 4) = 1 820): the optimum was found 14/25/33/38 times out
of 40 with b = 1/2/4/8, for 58/102/173/302 evaluations on average (mean excess error 0.23/0.088/0.024/0.004).
On the trained testbed at 50 % (C(16, 8) = 12 870) b = 1, 2, 4 and 8 all reach the exhaustive optimum in all 4
layers, and on a random 32-expert top-4 model at 25 % they choose the same set as b = 16 in both layers, on every
token and on 2 048 (`benchmarks/naee_tokens.py`). The width is not shrunk at large E, measured: on layer 0 of the
generated 128-expert top-8 checkpoint (`benchmarks/big_model.py`, random weights, 4 096 tokens, n_drop = 32) the
error of the set found keeps falling with the width: b = 1/2/8 end +12 % / +3.5 % / −15 % against b = 4 (3 600 /
8 522 / 29 489 evaluations against 15 401). `--beam 1` (plain greedy, ≈4× fewer evaluations at E=128) is there
for when time matters more.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.models.masking import masked_experts

Evaluate = Callable[[tuple[int, ...]], float]


class BatchEvaluate(Protocol):
    """An evaluator that also scores many sets at once (`naee_evaluator.FastEvaluator`)."""

    def __call__(self, dropped: tuple[int, ...]) -> float: ...

    def many(self, drops: list[tuple[int, ...]]) -> list[float]: ...


EXHAUSTIVE_BATCH = 1024  # subsets handed to the evaluator at once during the exhaustive enumeration
DEFAULT_BEAM = 4  # see the module docstring for why


@dataclass(frozen=True)
class SearchResult:
    dropped: tuple[int, ...]  # ascending original indices
    error: float  # err(dropped)
    evaluated: int  # sets scored
    exhaustive: bool  # True: proven optimum over all group-equal subsets


def _check(num_experts, n_drop, groups, protected, max_exhaustive) -> list[list[int]]:
    """Validate; return the droppable experts of each group."""
    for name, v, lo in (("num_experts", num_experts, 2), ("n_drop", n_drop, 1), ("groups", groups, 1),
                        ("max_exhaustive", max_exhaustive, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise MoePruneError(f"reconstruction search: {name} must be an integer >= {lo}, got {v!r}.")
    if num_experts % groups or n_drop % groups:
        raise MoePruneError(
            f"reconstruction search: {num_experts} experts in {groups} router groups need a drop count that is a "
            f"multiple of {groups} (same drop in every group) and E divisible by it; got n_drop={n_drop}."
        )
    bad = sorted(j for j in protected if not (isinstance(j, int) and 0 <= j < num_experts))
    if bad:
        raise MoePruneError(f"reconstruction search: protected experts {bad} are outside 0..{num_experts - 1}.")
    size, d = num_experts // groups, n_drop // groups
    cands = [[j for j in range(g * size, (g + 1) * size) if j not in protected] for g in range(groups)]
    for g, c in enumerate(cands):
        if len(c) < d or d >= size:
            raise MoePruneError(
                f"reconstruction search: group {g} must drop {d} of {size} experts but only {len(c)} are not "
                f"protected (and at least one must stay); lower the ratio or protect fewer experts."
            )
    return cands


def _batched(evaluate: Evaluate | BatchEvaluate) -> Callable[[list[tuple[int, ...]]], list[float]]:
    """Sets -> errors: the evaluator's own batched entry point `.many` when it has one, else one call per set."""
    many = getattr(evaluate, "many", None)
    if many is None:
        return lambda drops: [evaluate(D) for D in drops]
    return many


def _errs(score, drops: list[tuple[int, ...]]) -> list[float]:
    """score() -> the errors of `drops` (checked: one finite error per set)."""
    out = [float(e) for e in score()]
    if len(out) != len(drops):
        raise MoePruneError(f"reconstruction evaluator returned {len(out)} errors for {len(drops)} sets.")
    bad = next((i for i, e in enumerate(out) if not math.isfinite(e)), None)
    if bad is not None:
        raise MoePruneError(f"reconstruction error is {out[bad]} when dropping experts {list(drops[bad])}; check the "
                            f"cache.")
    return out


def search(evaluate: Evaluate | BatchEvaluate, num_experts: int, n_drop: int, *, groups: int = 1,
           protected: frozenset[int] | set[int] = frozenset(), max_exhaustive: int = 5000,
           beam: int = DEFAULT_BEAM, desc: str = "NAEE search") -> SearchResult:
    """Minimise `evaluate(D)` over group-equal sets D of `n_drop` unprotected experts (see module docstring):
    exhaustive up to `max_exhaustive` subsets, beam search of width `beam` beyond (beam=1: plain greedy).

    `evaluate` gets D as an ascending tuple; an evaluator with a `.many(list of D) -> list of errors` method gets
    every child of a beam step (and the exhaustive subsets, `EXHAUSTIVE_BATCH` at a time) in one call instead; one
    with `.extend(D, [j …]) -> errors of D ∪ {j}` gets each beam parent's new children from that parent.
    Ties keep the lowest set in lexicographic order.
    """
    cands = _check(num_experts, n_drop, groups, set(protected), max_exhaustive)
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise MoePruneError(f"reconstruction search: beam must be an integer >= 1, got {beam!r}.")
    d = n_drop // groups
    n_subsets = math.prod(math.comb(len(c), d) for c in cands)
    best: tuple[float, tuple[int, ...]] | None = None
    evaluated = 0
    many = _batched(evaluate)
    extend = getattr(evaluate, "extend", None)  # D, [j …] -> errors of D ∪ {j} (`naee_incremental`)
    if n_subsets <= max_exhaustive:
        subsets = (tuple(sorted(itertools.chain.from_iterable(parts)))
                   for parts in itertools.product(*(itertools.combinations(c, d) for c in cands)))
        with tqdm(total=n_subsets, desc=f"{desc} (exhaustive)", leave=False, disable=n_subsets < 64) as bar:
            while batch := list(itertools.islice(subsets, EXHAUSTIVE_BATCH)):
                for D, e in zip(batch, _errs(lambda: many(batch), batch), strict=True):  # noqa: B023 - called now
                    if best is None or e < best[0]:
                        best = (e, D)
                evaluated += len(batch)
                bar.update(len(batch))
        return SearchResult(best[1], best[0], evaluated, True)
    size = num_experts // groups
    n_cands = sum(len(c) for c in cands)
    bound = sum(min(beam + 1, math.comb(n_cands, i)) * (n_cands - i) for i in range(n_drop))
    beams: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    chain: tuple[int, ...] = ()  # the plain greedy path, always expanded: the result is never worse than greedy
    with tqdm(total=bound, desc=f"{desc} (beam {beam})", leave=False, disable=bound < 64) as bar:
        for _ in range(n_drop):
            children: dict[tuple[int, ...], float] = {}  # two parents can share a child: evaluated once
            chain_trials: list[tuple[int, ...]] = []
            parents = [D for _, D in beams] + ([chain] if chain not in {D for _, D in beams} else [])
            added: dict[tuple[int, ...], list[int]] = {}  # parent -> the experts its new children add
            for D in parents:
                taken = [sum(1 for j in D if j // size == g) for g in range(groups)]
                for j in (j for g, c in enumerate(cands) if taken[g] < d for j in c if j not in D):
                    trial = tuple(sorted((*D, j)))
                    if trial not in children:
                        added.setdefault(D, []).append(j)
                    children.setdefault(trial, math.nan)
                    if D == chain:
                        chain_trials.append(trial)
            if extend is None:
                trials = list(children)
                scored = [(trials, lambda trials=trials: many(trials))]  # the whole step in one batched call
            else:  # per parent, its new children from its own route (`naee_incremental`)
                scored = [([tuple(sorted((*D, j))) for j in js], lambda D=D, js=js: extend(D, js))
                          for D, js in added.items()]
            for trials, score in scored:
                for trial, e in zip(trials, _errs(score, trials), strict=True):
                    children[trial] = e
                evaluated += len(trials)
                bar.update(len(trials))
            chain_children = [(children[t], t) for t in chain_trials]
            ranked = sorted((e, D) for D, e in children.items())  # (error, then lexicographic) order
            chain = min(chain_children)[1]
            beams = ranked[:beam] + [(children[chain], chain)] * (chain not in {D for _, D in ranked[:beam]})
    beams.sort()
    return SearchResult(beams[0][1], beams[0][0], evaluated, False)


def block_evaluator(model: torch.nn.Module, adapter, layer: int, X: list[torch.Tensor],
                    Z: list[torch.Tensor], valid: list[torch.Tensor] | None = None) -> Evaluate:
    """err(D) = Σ_b ‖Z_b − block_{E∖D}(X_b)‖_F², accumulated in float64, where block_{E∖D} is the model's own MoE
    block of `layer` run with experts D masked inside its own router (`models.masking.masked_experts`).

    X_b, Z_b: the block's cached input / output for batch b (same shape, e.g. [B, T, H]); moved to the block's
    device per call. Shared experts are part of Z and of the block output, so they cancel out of the error.
    `valid` ([B, T] bool per batch): sum over real tokens only (the block is per token, so padding rows do not
    change the others); None: every row counts. This is the reference the fast evaluator
    (`select/naee_outputs.py`) is tested and benchmarked against.
    """
    if len(X) != len(Z) or not X:
        raise MoePruneError(f"reconstruction needs one cached output per input batch, got {len(X)} and {len(Z)}.")
    bad = [b for b, (x, z) in enumerate(zip(X, Z, strict=True)) if x.shape != z.shape]
    if bad:
        raise MoePruneError(f"cached MoE inputs and outputs differ in shape for batches {bad}; re-capture them.")
    if valid is not None and [tuple(v.shape) for v in valid] != [tuple(x.shape[:-1]) for x in X]:
        raise MoePruneError("reconstruction: the valid masks must be [B, T] for every cached batch.")
    block = adapter.block(model, layer)
    device = next(block.parameters()).device
    weights = [None] * len(X) if valid is None else [v.to(device, torch.float64) for v in valid]

    @torch.no_grad()
    def evaluate(dropped: tuple[int, ...]) -> float:
        err = torch.zeros((), dtype=torch.float64, device=device)
        with masked_experts(model, adapter, {layer: list(dropped)}):
            for x, z, w in zip(X, Z, weights, strict=True):
                out = block(x.to(device))
                out = out[0] if isinstance(out, tuple) else out  # some blocks also return router logits
                sq = (z.to(device).double() - out.double()).square().sum(dim=-1)  # [B, T] ‖·‖², float64
                err += sq.sum() if w is None else (sq * w).sum()
        return float(err)

    return evaluate

"""NAEE's reconstruction error without block forwards: every expert's output is computed once per layer, and one
evaluation of err(D) is a router forward plus a few gathers.

The MoE block's output on token t is o_t = R_t + Σ_{j∈S(t)} w_j(t)·y_j(t): y_j(t) = expert j's output on x_t with
gate weight 1, S(t) / w(t) = the top-k indices / gate weights the router returns, R_t = everything that does not
depend on the routed experts (shared experts and their gates; 0 for plain blocks). With experts D masked inside the
model's own router (`models.masking.masked_experts`) only S and w change, so with U_t = Z_t − R_t (the unmasked
routed part)

    err(D) = Σ_t ‖U_t − Σ_{s<k} w_s y_{i_s}(t)‖²
           = Σ_t ‖U_t‖² − 2 Σ_s w_s A_t[i_s] + Σ_{s,s'} w_s w_s' G_t[i_s, i_s'],     (i, w) = router_D(x_t)
      A_t[j] = ⟨U_t, y_j(t)⟩  [T, E],     G_t[i, j] = ⟨y_i(t), y_j(t)⟩  [T, E, E]      (float64)

over the real tokens t of the cached block inputs X / outputs Z (padding rows are dropped with the cached
[B, S] valid mask). Precomputation (`expert_outputs`), once per layer, by the model's own code:
- y: the experts module is called once per expert j with every token routed to j and gate weight 1 (its own
  eager code; no [n·E, H] repeated input): E/k times the routed expert work of one forward, 6·E·H·I FLOPs per
  token in the model's dtype; y [n, E, H] is reduced to A, G (E²·H + E·H float64 multiply-adds per token, two
  tokens at a time so their float64 copy stays in cache) and ‖U‖², then dropped;
- R: one block forward with the experts module answering zeros, so whatever else the block adds (Qwen2-MoE's
  sigmoid-gated shared expert, DeepSeek/GLM shared experts, ...) is exactly what the block computes. This relies
  on the block adding the experts' output to the rest, which holds for every supported family (checked per family
  in tests/test_naee_fast.py against the block-forward reference `reconstruction.block_evaluator`).
Candidates (`naee_candidates.py`, `max_dropped` = d given): where masking never reorders the router's selection
(`RoutingSpec.local_selection`), a route under any |D| ≤ d stays within the token's first C = k·(⌈d/k⌉ + 2) choices,
so y, G and A are computed for those only (C replaces E in the costs below; a [T, E] slot table maps experts to
them): at E = 128, k = 8, 25 %, C = 48. Of those, the precompute fills each token's first 2k slots and the evaluator
the rest when a route first reaches them (`naee_fill.py`): on the big-model checkpoint 16 expert rows per token
instead of 48. The k of those the token was routed to were computed by the calibration pass that cached X and Z
(the statistics collector's per-slot outputs, `known`, recorded for the tokens kept here): they are copied, not
computed, so 8 rows per token remain there. Where masking can reorder the selection (a group limit, a selection
bias) no C bounds the route: each token starts with its first 2k choices and an expert a route reaches gets a slot
then ("open" candidates, `naee_fill.assign`), instead of every expert for every token.
Each evaluation then runs only the router module under the mask — every routing rule (softmax-top-k with or
without renormalisation, Mixtral's top-k, gpt-oss's top-k-then-softmax, DeepSeek/GLM sigmoid group-limited with
correction bias, routed scaling) is the model's own — and costs per token 2·H·E FLOPs (router) + O(E log k)
(top-k) + k + k² gathers and ≈ 2k² + 2k float64 FLOPs, instead of the block's 6·k·H·I expert FLOPs plus its
per-expert Python loop. (Gathering y [T, k, H] per evaluation instead would cost k·H per token and keep T·E·H
values in memory; the Gram form is the same quantity, exact in float64, smaller whenever 8·E < H·s.)

Memory (T real tokens kept, E experts, H hidden, s / s_x = bytes per element of the experts' output / the input):
    kept:        T·(E² + E + 1)·8 + T·H·s_x       (G, A, ‖U‖² per token, router inputs x; with candidates C for E,
                                                    plus T·(E + C + H + 1)·8: slot table, order, U, fill count;
                                                    with `known`, T·k·(H·s + 8), also held from the calibration pass)
    precompute:  ≤ 256 MiB (`PRECOMPUTE_BYTES`) of temporaries: y on n tokens at a time, n chosen so that
                 n·(E·H·s + 4·H·s + 3·I·s + 8·E) fits (y, one expert call's intermediates), + 2·E·H·8 (the
                 float64 copy), plus the block forward for R on c = `chunk_tokens` tokens (default 2048)
    evaluation:  one set: per chunk of c tokens c·(E·16 + k²·24) temporaries; b sets at once (`FastEvaluator.many`,
                 what the search uses): ≈ `EVAL_BYTES` (256 MiB), b chosen to fit (class docstring)
Token budget: the search costs (tokens kept) × (evaluations) × 0.4–2 µs (`reconstruction.py`), so the NAEE decider
keeps at most `DEFAULT_SEARCH_TOKENS` = 2 048 real tokens per layer (stage option `search_tokens`, `prune
--search-tokens`; 0 = every token), and `max_bytes` (default 4 GiB) bounds what is kept. Beyond either cap an
evenly strided subset of the real tokens is kept (every ⌈T/cap⌉-th in cache order, so every batch and domain is
represented) and a warning says how many; the search then minimises the error on that subset, as a calibration of
that many tokens would. The default is measured (`benchmarks/naee_tokens.py`: progressive runs; per layer the
capped search against the uncapped one on the same cache, exhaustive where C(E, n_drop) ≤ 20 000, else beam 16;
same = layers choosing the reference's set; excess = err(D) / err(D_ref) − 1 on every cached token, mean / worst
over layers; ppl = held-out perplexity ratio of the capped run's own plan, geo-mean over 4 domains; beam 4):

    tokens kept   testbed 25 % (E=16, top-2)    testbed 50 %                   random 32-expert top-4, 25 %
    all (≈8 k)    4/4  0     / 0      1.048     4/4  0     / 0      2.083      2/2  0     / 0
    4 096         4/4  0     / 0      1.048     3/4  +0.2 % / +1.0 %  2.130    1/2  +0.7 % / +1.5 %
    2 048         3/4  +1.5 % / +5.9 %  1.048   2/4  +1.7 % / +5.7 %  2.127    1/2  +0.7 % / +1.5 %
    1 024         4/4  0     / 0      1.048     2/4  +1.9 % / +5.7 %  2.134    0/2  +7.1 % / +12.7 %
      512         2/4  +12 % / +35 %  1.056     1/4  +8.7 % / +18 %   1.857    0/2  +6.1 % / +9.5 %
      256         1/4  +49 % / +169 % 1.054     0/4  +17 % / +34 %    1.938    0/2  +7.4 % / +8.6 %

No cap below "all" keeps every choice (near-ties are decided by which tokens are sampled, as with a smaller
calibration); ≥ 2 048 tokens keeps the excess ≤ 6 % (mean ≤ 2 %) and the perplexity where it is with every token at
25 % and within the spread between equally good plans at 50 % (1.86–2.13 there: reconstruction error is a loose
proxy for perplexity at 50 %); 1 024 lets it reach 13 % on the random model, ≤ 512 12–49 % on average. At E=128
top-8, 2 048 tokens cost ≈ 60 s per layer at beam 4 on one CPU thread scoring every child whole (4 096: ≈ 150 s),
≈ 5–6 s with the incremental scoring of local routers (`naee_incremental.py`). On the generated 128-expert
checkpoint of `benchmarks/big_model.py` (random weights: 19 of 128 experts unused and 37 used ≤ 3 times on 4 096
tokens, 8 experts take 42 % of the routings) every cap changes both layers tried (at 2 048 their error on all 4 096
tokens is 3.7× / 6.5× the reference's): the best sets' error there comes from a handful of tokens, so any subset
moves it. Where the choice matters more than the time, keep every token (`--search-tokens 0`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.calibration.session import eager_experts, strided_rows
from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.models.silenced import experts_silenced
from moeprune.select.naee_candidates import candidate_count, candidates, first_unique, open_candidates, slot_table
from moeprune.select.naee_fill import every_expert_gram, fill, initial_fill

DEFAULT_SEARCH_TOKENS = 2048  # real tokens NAEE's search keeps per layer (module docstring: measured)
DEFAULT_MAX_BYTES = 4 << 30  # what is kept (G, A, x) may take 4 GiB before tokens are subsampled
DEFAULT_CHUNK = 2048  # tokens per router call (and per stored chunk)
PRECOMPUTE_BYTES = 256 << 20  # bound on y and the expert calls' temporaries (E=128: 1 GiB was no faster, +270 MB RSS)


@dataclass
class ExpertOutputs:
    """Per chunk of c real tokens (module docstring): router input x [c, H], Gram G [c, E, E] and cross terms
    A [c, E] (float64); `target_sq` = Σ_t ‖U_t‖² over all kept tokens; `total_tokens`: real tokens in the cache
    before any budget cap."""

    x: list[torch.Tensor] = field(default_factory=list)
    gram: list[torch.Tensor] = field(default_factory=list)
    cross: list[torch.Tensor] = field(default_factory=list)
    target_sq: float = 0.0
    total_tokens: int = 0
    # what the block passes its router besides the hidden states (afmoe `expert_bias`, hy_v3 / minimax_m2
    # `e_score_correction_bias`): token-independent, recorded once and replayed by `FastEvaluator`
    router_args: tuple = ()
    router_kwargs: dict = field(default_factory=dict)
    router_rank: int = 2  # the block hands its router [T, H] (2) or [B, S, H] (3, afmoe)
    # per chunk [c, E]: expert -> its slot among the token's candidates (`naee_candidates`), G / A then [c, C, C] /
    # [c, C]; empty: every expert has its own slot (C = E)
    slots: list[torch.Tensor] = field(default_factory=list)
    # with candidates, per chunk, for the slots filled on demand (`naee_fill`): order [c, C] each token's candidates
    # in selection order, target [c, H] float64 U_t, filled [c] slots filled so far
    order: list[torch.Tensor] = field(default_factory=list)
    target: list[torch.Tensor] = field(default_factory=list)
    filled: list[torch.Tensor] = field(default_factory=list)
    assigned: list[torch.Tensor] = field(default_factory=list)  # [c] slots holding an expert (order[:, :assigned])
    open: bool = False  # candidates are assigned as routes reach them (`naee_candidates.open_candidates`)
    fill_slots: int = 1  # token slots per expert pass of a fill (bounds its temporaries, as the precompute's)
    rows_computed: int = 0  # expert rows computed so far (precompute and fills)
    # with candidates and the calibration pass's routed outputs given (`expert_outputs(known=...)`), per chunk:
    # (idx [c, k], y [c, k, H]), copied by the fills where a candidate is among them
    known: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(x.shape[0] for x in self.x)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.x, self.gram, self.cross, self.slots, self.order,
                                                             self.target, self.filled, self.assigned,
                                                             [t for pair in self.known for t in pair]) for t in ts)


def keep_stride(total: int, cap: int) -> tuple[int, int]:
    """(stride, kept): keep every stride-th real token so that at most `cap` remain."""
    stride = max(1, math.ceil(total / max(cap, 1)))
    return stride, -(-total // stride)


@torch.no_grad()
def expert_outputs(model: nn.Module, adapter: MoEAdapter, layer: int, X: list[torch.Tensor], Z: list[torch.Tensor],
                   valid: list[torch.Tensor] | None = None, *, max_tokens: int | None = None,
                   max_bytes: int = DEFAULT_MAX_BYTES, chunk_tokens: int = DEFAULT_CHUNK,
                   max_dropped: int | None = None, known: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                   known_stride: int = 0) -> ExpertOutputs:
    """Precompute G, A, ‖U‖² (see module docstring) on the real tokens of cached block inputs X / outputs Z ([B, S, H]
    per batch; `valid` [B, S] bool per batch, None = every token is real). Runs on the block's device, the experts
    on their eager code path (`calibration.session.eager_experts`, as calibration runs them). `max_dropped`: the
    largest dropped set that will be scored; where the routing allows, each token then keeps only its candidates
    (`naee_candidates.py`); None: every expert. `known`: per batch (idx [r_b, k], y [r_b, k, H]) for every
    `known_stride`-th real token (counted over the batches in order), the outputs the calibration pass computed for
    those tokens' routed experts at gate weight 1 (`calibration.session.BlockIO.routed`): with candidates, and when
    this precompute keeps every `known_stride`-th token too, the fills copy them instead of computing them again
    (the first k of a token's first 2k slots, where the routing is unchanged); otherwise they are not used."""
    if len(X) != len(Z) or not X or (valid is not None and len(valid) != len(X)):
        raise MoePruneError(f"NAEE needs one cached output (and mask) per input batch, got {len(X)} inputs, "
                            f"{len(Z)} outputs, {'no' if valid is None else len(valid)} masks.")
    for name, v in (("max_tokens", max_tokens), ("max_bytes", max_bytes), ("chunk_tokens", chunk_tokens),
                    ("max_dropped", max_dropped)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise MoePruneError(f"NAEE expert outputs: {name} must be a positive integer, got {v!r}.")
    bad = [b for b, (x, z) in enumerate(zip(X, Z, strict=True)) if x.shape != z.shape]
    if bad:
        raise MoePruneError(f"cached MoE inputs and outputs differ in shape for batches {bad}; re-capture them.")
    if known is not None and (len(known) != len(X) or any(
            i.dim() != 2 or y.shape != (*i.shape, x.shape[-1]) for (i, y), x in zip(known, X, strict=True))):
        raise MoePruneError("NAEE: the recorded routed outputs do not match the cached inputs (one (idx [r, k], "
                            "y [r, k, H]) per batch); re-capture them.")
    H, E = X[0].shape[-1], adapter.num_experts
    masks = [torch.ones(x.shape[:-1], dtype=torch.bool) if valid is None else v.bool() for x, v in
             zip(X, valid if valid is not None else X, strict=True)]
    bad = [b for b, (x, m) in enumerate(zip(X, masks, strict=True)) if tuple(m.shape) != tuple(x.shape[:-1])]
    if bad:
        raise MoePruneError(f"valid masks do not match the cached inputs' [B, S] for batches {bad}.")
    total = int(sum(int(m.sum()) for m in masks))
    if total == 0:
        raise MoePruneError("NAEE: the cached batches hold no real (non-padding) token; check the calibration data.")
    block = adapter.block(model, layer)
    experts = adapter.experts(block)
    device = next(block.parameters()).device
    C = candidate_count(adapter, max_dropped)  # slots per token (E: every expert)
    # bytes kept per token: G, A, ‖U‖², x; with candidates the slot table, order, U, fill count
    per_token = (C * C + C + 1) * 8 + H * X[0].element_size() + ((E + C + H + 1) * 8 if C < E else 0)
    if known is not None and C < E:  # the fills copy the calibration pass's outputs (kept: idx and y)
        per_token += known[0][0].shape[1] * (8 + H * known[0][1].element_size())
    cap = min(max_tokens or total, max(1, max_bytes // per_token))
    stride, kept = keep_stride(total, cap)
    reuse = known is not None and C < E and known_stride == stride
    if stride > 1:
        why = (f"the token budget is {max_tokens} (search_tokens; 0 = every token)"
               if max_tokens is not None and max_tokens <= max_bytes // per_token else
               f"their Gram matrices would take {total * per_token / 2**30:.1f} GiB (max_bytes)")
        logger.warning("NAEE layer %d: searching on %d of %d real tokens (every %d-th): %s.", layer, kept, total,
                       stride, why)
    rows, zrows, kidx, ky, seen = [], [], [], [], 0
    for b, (x, z, m) in enumerate(zip(X, Z, masks, strict=True)):
        keep, seen = strided_rows(m.reshape(-1), seen, stride)  # [B·S]
        rows.append(x.reshape(-1, H)[keep])  # [t_b, H]
        zrows.append(z.reshape(-1, H)[keep])  # [t_b, H]
        if reuse:
            reuse = known[b][0].shape[0] == int(keep.sum())  # the same tokens, in the same order
            kidx.append(known[b][0])  # [t_b, k]
            ky.append(known[b][1])  # [t_b, k, H]
    xs, zs = torch.cat(rows), torch.cat(zrows)  # [T, H] each: batches share chunks (fewer router calls)
    kidx_all, ky_all = (torch.cat(kidx), torch.cat(ky)) if reuse else (None, None)  # [T, k], [T, k, H]
    item = next(experts.parameters()).element_size()
    width = adapter.expert_width or H
    sub = max(1, min(chunk_tokens, PRECOMPUTE_BYTES // (C * H * item + 4 * H * item + 3 * width * item + 8 * C)))
    out = ExpertOutputs(total_tokens=total, fill_slots=sub * C, open=C < E and open_candidates(adapter))
    target_sq = torch.zeros((), dtype=torch.float64, device=device)
    router = adapter.router(block)
    with eager_experts(model):
        for start in range(0, xs.shape[0], chunk_tokens):
            xr = xs[start:start + chunk_tokens].to(device)  # [c, H]
            with experts_silenced(experts), _router_call(router, out, xr.shape[0]) if start == 0 else nullcontext():
                rest = block(xr[None])  # [1, c, H] the block with the routed part zeroed
            rest = rest[0] if isinstance(rest, tuple) else rest  # gpt-oss also returns router scores
            u = zs[start:start + chunk_tokens].to(device).double() - rest.reshape(-1, H).double()  # [c, H] Z − R
            c = xr.shape[0]
            if C == E:
                gram = torch.empty(c, C, C, dtype=torch.float64, device=device)  # [c, C, C]
                cross = torch.empty(c, C, dtype=torch.float64, device=device)  # [c, C]
                every_expert_gram(experts, xr, u, gram, cross, sub)
                out.rows_computed += c * C
            else:  # each token's first slots now, the rest when a route reaches them (`naee_fill`)
                F = initial_fill(C, adapter.top_k)
                first = candidates(model, adapter, layer, xr, F if out.open else C, out.router_args,
                                   out.router_kwargs, out.router_rank)  # [c, F] or [c, C] in selection order
                assigned = first_unique(first) if out.open else torch.full((c,), C, device=device)  # [c]
                order = torch.full((c, C), -1, dtype=torch.long, device=device)  # [c, C]
                beyond = torch.arange(first.shape[1], device=device) >= assigned[:, None]  # [c, F] after a repeat
                order[:, :first.shape[1]] = first.masked_fill(beyond, -1)
                gram = torch.full((c, C, C), float("nan"), dtype=torch.float64, device=device)  # [c, C, C]
                cross = torch.full((c, C), float("nan"), dtype=torch.float64, device=device)  # [c, C]
                filled = torch.zeros(c, dtype=torch.long, device=device)  # [c]
                every = torch.arange(c, device=device)
                have = None
                if reuse:
                    have = (kidx_all[start:start + c].to(device), ky_all[start:start + c].to(device))
                    out.known.append(have)
                out.rows_computed += fill(experts, xr, u, order, gram, cross, filled, every,
                                          assigned.clamp_max(F), out.fill_slots, have)
                out.slots.append(slot_table(order, E))
                out.order.append(order)
                out.target.append(u)
                out.filled.append(filled)
                out.assigned.append(assigned)
            out.x.append(xr)
            out.gram.append(gram)
            out.cross.append(cross)
            target_sq += u.square().sum()
    out.target_sq = float(target_sq)
    return out


@contextmanager
def _router_call(router: nn.Module, out: ExpertOutputs, tokens: int) -> Iterator[None]:
    """Record in `out` the arguments the block passes its router after the hidden states. They must not depend on
    the tokens (a tensor with one row per token could not be replayed on other rows): refused then."""

    def keep(module, args, kwargs) -> None:
        extra = [*args[1:], *kwargs.values()]
        per_token = [t for t in extra if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == tokens
                     and not isinstance(t, nn.Parameter)]
        if per_token:
            raise MoePruneError(f"{type(module).__name__} takes per-token arguments besides the hidden states; "
                                "NAEE's fast evaluator cannot replay them.")
        out.router_args, out.router_kwargs, out.router_rank = tuple(args[1:]), dict(kwargs), args[0].dim()

    hook = router.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()

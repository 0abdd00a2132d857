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
- y: the experts module is called with `top_k_index` = every expert and weight 1 (as
  `stats/routed.py:RoutedCollector._probe_outputs` does): E/k times the routed expert work of one forward; each
  chunk of y [c, E, H] is reduced to A, G, ‖U‖² (c·E²·H float64 multiply-adds) and dropped;
- R: one block forward with the experts module answering zeros, so whatever else the block adds (Qwen2-MoE's
  sigmoid-gated shared expert, DeepSeek/GLM shared experts, ...) is exactly what the block computes. This relies
  on the block adding the experts' output to the rest, which holds for every supported family (checked per family
  in tests/test_naee_fast.py against the block-forward reference `reconstruction.block_evaluator`).
Each evaluation then runs only the router module under the mask — every routing rule (softmax-top-k with or
without renormalisation, Mixtral's top-k, gpt-oss's top-k-then-softmax, DeepSeek/GLM sigmoid group-limited with
correction bias, routed scaling) is the model's own — and costs per token 2·H·E FLOPs (router) + O(E log k)
(top-k) + k + k² gathers and ≈ 2k² + 2k float64 FLOPs, instead of the block's 6·k·H·I expert FLOPs plus its
per-expert Python loop. (Gathering y [T, k, H] per evaluation instead would cost k·H per token and keep T·E·H
values in memory; the Gram form is the same quantity, exact in float64, smaller whenever 8·E < H·s.)

Memory (T real tokens kept, E experts, H hidden, s / s_x = bytes per element of the experts' output / the input):
    kept:        T·(E² + E + 1)·8 + T·H·s_x       (G, A, ‖U‖² per token, router inputs x)
    precompute:  ≤ 1 GiB (`PRECOMPUTE_BYTES`) of temporaries: the experts run on n tokens × E at a time, n chosen
                 so that n·E·(H·(2s + 16) + 3·I·s) fits (repeated rows, y and its float64 copy, the experts'
                 own intermediates), plus the block forward for R on c = `chunk_tokens` tokens (default 2048)
    evaluation:  per chunk of c tokens: c·E·4 (router) + c·k²·8 temporaries
Token budget: when the kept bytes exceed `max_bytes` (default 4 GiB) or T exceeds `max_tokens`, an evenly strided
subset of the real tokens is kept (every ⌈T/cap⌉-th in cache order) and a warning says how many; the search then
minimises the error on that subset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_experts

DEFAULT_MAX_BYTES = 4 << 30  # what is kept (G, A, x) may take 4 GiB before tokens are subsampled
DEFAULT_CHUNK = 2048  # tokens per router call (and per stored chunk)
PRECOMPUTE_BYTES = 1 << 30  # bound on the temporaries of one call of the experts on every expert


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

    @property
    def tokens(self) -> int:
        return sum(x.shape[0] for x in self.x)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.x, self.gram, self.cross) for t in ts)


@contextmanager
def _experts_silenced(experts: nn.Module) -> Iterator[None]:
    """While active the experts module returns zeros: the block's output is then its expert-independent rest R."""

    def forward(hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)

    experts.forward = forward
    try:
        yield
    finally:
        del experts.forward  # back to the class's forward


def _every_expert(experts: nn.Module, h: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n, H] tokens -> [n, E, H] every expert's output with gate weight 1, by the model's own experts code."""
    n, E = h.shape[0], num_experts
    every = torch.arange(E, device=h.device).repeat(n).view(-1, 1)  # [n·E, 1] expert of each row
    one = torch.ones(n * E, 1, dtype=h.dtype, device=h.device)  # gate weight 1
    return experts(h.repeat_interleave(E, dim=0), every, one).view(n, E, -1)  # [n, E, H]


def _keep_mask(total: int, cap: int) -> tuple[int, int]:
    """(stride, kept): keep every stride-th real token so that at most `cap` remain."""
    stride = max(1, math.ceil(total / max(cap, 1)))
    return stride, -(-total // stride)


@torch.no_grad()
def expert_outputs(model: nn.Module, adapter: MoEAdapter, layer: int, X: list[torch.Tensor], Z: list[torch.Tensor],
                   valid: list[torch.Tensor] | None = None, *, max_tokens: int | None = None,
                   max_bytes: int = DEFAULT_MAX_BYTES, chunk_tokens: int = DEFAULT_CHUNK) -> ExpertOutputs:
    """Precompute G, A, ‖U‖² (see module docstring) on the real tokens of cached block inputs X / outputs Z ([B, S, H]
    per batch; `valid` [B, S] bool per batch, None = every token is real). Runs on the block's device, the experts
    on their eager code path (`calibration.session.eager_experts`, as calibration runs them)."""
    from moeprune.calibration.session import eager_experts

    if len(X) != len(Z) or not X or (valid is not None and len(valid) != len(X)):
        raise MoePruneError(f"NAEE needs one cached output (and mask) per input batch, got {len(X)} inputs, "
                            f"{len(Z)} outputs, {'no' if valid is None else len(valid)} masks.")
    for name, v in (("max_tokens", max_tokens), ("max_bytes", max_bytes), ("chunk_tokens", chunk_tokens)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise MoePruneError(f"NAEE expert outputs: {name} must be a positive integer, got {v!r}.")
    bad = [b for b, (x, z) in enumerate(zip(X, Z, strict=True)) if x.shape != z.shape]
    if bad:
        raise MoePruneError(f"cached MoE inputs and outputs differ in shape for batches {bad}; re-capture them.")
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
    per_token = (E * E + E + 1) * 8 + H * X[0].element_size()  # bytes kept per token
    cap = min(max_tokens or total, max(1, max_bytes // per_token))
    stride, kept = _keep_mask(total, cap)
    if stride > 1:
        logger.warning("NAEE layer %d: the expert-output Gram matrices of %d tokens would take %.1f GiB; using %d "
                       "tokens (every %d-th real token). Raise max_bytes / max_tokens to use them all.", layer,
                       total, total * per_token / 2**30, kept, stride)
    rows, zrows, seen = [], [], 0
    for x, z, m in zip(X, Z, masks, strict=True):
        m = m.reshape(-1)  # [B·S]
        pos = seen + torch.cumsum(m.long(), 0) - 1  # [B·S] index among all real tokens so far
        keep = m & (pos % stride == 0)  # [B·S]
        seen += int(m.sum())
        rows.append(x.reshape(-1, H)[keep])  # [t_b, H]
        zrows.append(z.reshape(-1, H)[keep])  # [t_b, H]
    xs, zs = torch.cat(rows), torch.cat(zrows)  # [T, H] each: batches share chunks (fewer router calls)
    item = next(experts.parameters()).element_size()
    width = adapter.expert_width or H
    sub = max(1, min(chunk_tokens, PRECOMPUTE_BYTES // (E * (H * (2 * item + 16) + 3 * width * item))))
    out = ExpertOutputs(total_tokens=total)
    target_sq = torch.zeros((), dtype=torch.float64, device=device)
    with eager_experts(model):
        for start in range(0, xs.shape[0], chunk_tokens):
            xr = xs[start:start + chunk_tokens].to(device)  # [c, H]
            with _experts_silenced(experts):
                rest = block(xr[None])  # [1, c, H] the block with the routed part zeroed
            rest = rest[0] if isinstance(rest, tuple) else rest  # gpt-oss also returns router scores
            u = zs[start:start + chunk_tokens].to(device).double() - rest.reshape(-1, H).double()  # [c, H] Z − R
            grams, crosses = [], []
            for s0 in range(0, xr.shape[0], sub):  # bounded temporaries: [n, E, H] per call
                y = _every_expert(experts, xr[s0:s0 + sub], E).double()  # [n, E, H]
                grams.append(torch.bmm(y, y.transpose(1, 2)))  # [n, E, E] ⟨y_i, y_j⟩
                crosses.append(torch.bmm(y, u[s0:s0 + sub, :, None])[..., 0])  # [n, E] ⟨U, y_j⟩
            out.x.append(xr)
            out.gram.append(torch.cat(grams))  # [c, E, E]
            out.cross.append(torch.cat(crosses))  # [c, E]
            target_sq += u.square().sum()
    out.target_sq = float(target_sq)
    return out


class _ReplayLinear(TorchFunctionMode):
    """Serves `F.linear` calls whose tensor arguments all lie in `alive` (the cached router inputs and the router's
    own parameters, which stay alive and unchanged during a search) from the result of the first such call.

    The router logits do not depend on D, so each evaluation replays them instead of redoing the [c, H]×[H, E]
    product; the router still runs every other op of its own code, and `masked_experts` (the inner mode) adds its
    mask to a copy. Any other linear (e.g. on a dtype-converted copy of the input) is computed as usual."""

    def __init__(self, alive: set[int]):
        super().__init__()
        self.alive, self.cache = alive, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "linear" or kwargs:
            return func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(tensors) != len([a for a in args if a is not None]) or any(t.data_ptr() not in self.alive
                                                                           for t in tensors):
            return func(*args, **kwargs)
        key = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in tensors)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = func(*args, **kwargs)
        return hit.clone()  # the router may write into what it gets; the cache stays as recorded


def fast_evaluator(model: nn.Module, adapter: MoEAdapter, layer: int, outputs: ExpertOutputs):
    """err(D) (module docstring) from precomputed `outputs`: the layer's own router under the mask (its
    D-independent logits replayed, `_ReplayLinear`), gathers of G and A, float64 accumulation. Returns a callable
    D -> float for `reconstruction.search`."""
    router = adapter.router(adapter.block(model, layer))
    k = adapter.top_k
    replay = _ReplayLinear({t.data_ptr() for t in [*outputs.x, *router.parameters(), *router.buffers()]})
    # flat offsets of token t's block in G [c·E·E]
    bases = [(torch.arange(g.shape[0], device=g.device) * g.shape[1] ** 2)[:, None, None] for g in outputs.gram]

    @torch.no_grad()
    def evaluate(dropped: tuple[int, ...]) -> float:
        err = torch.zeros((), dtype=torch.float64, device=outputs.gram[0].device)
        with replay, masked_experts(model, adapter, {layer: list(dropped)}):
            for x, gram, cross, base in zip(outputs.x, outputs.gram, outputs.cross, bases, strict=True):
                c, E, _ = gram.shape
                routed = router(x)
                w, idx = routed[1].double(), routed[2]  # [c, k] gate weights, [c, k] expert indices (the model's own)
                if idx.shape != (c, k):
                    raise MoePruneError(f"router of layer {layer} returned indices of shape {tuple(idx.shape)}, "
                                        f"expected [{c}, {k}]: NAEE's fast evaluator cannot read it.")
                a = cross.gather(1, idx)  # [c, k] ⟨U, y_{i_s}⟩
                g = gram.view(-1)[base + idx[:, :, None] * E + idx[:, None, :]]  # [c, k, k] ⟨y_{i_s}, y_{i_s'}⟩
                err += (g * w[:, :, None] * w[:, None, :]).sum() - 2 * (w * a).sum()
        return float(err) + outputs.target_sq

    return evaluate

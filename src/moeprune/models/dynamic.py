"""Per-token routing policies applied inside the model's *own* router code (top-k, top-p, NAEE skipping, ...).

`masking.py` removes the same experts for every token; here a policy drops, per token, some of the experts the
router selected. Each router call runs twice (a forward hook on the router module):

1. the router as it is: its output gives, per token t, the selected experts T_t = idx[t, :k] and their weights
   w[t, :k] (the values the family hands its experts), and its logits ℓ. The policy keeps a subset S_t ⊆ T_t
   (never empty; `routing/rules.py`), from w and the selection score σ_t = the value the router ranks experts by.
2. the router again, under a TorchFunctionMode that masks, per row, the experts outside S_t at the ops the routing
   kind names (`POLICY_OPS`); the model's code then selects S_t, and renormalises, scales and casts as it always
   does. "An expert whose weight is dropped" means, per kind:

   - ``softmax_topk`` / ``softmax_grouped`` / ``softmax_bias``: its softmax probability is set to 0 (not the
     logit to -inf: p = softmax over *all* E stays the model's own). top-k then takes S_t first; w_i = p_i for
     i ∈ S_t, ÷ Σ_{S_t} p with ``norm_topk_prob`` — exactly what the stock router does with top-|S_t|.
   - a softmax router whose code has no width-E softmax (top-k on the logits, then a softmax over the k selected:
     aria, granitemoe — the same function as a renormalised softmax top-k): its logit is -inf, as below.
   - ``topk_softmax`` (gpt-oss): its logit is -inf; top-k takes S_t first and the softmax over the selected logits
     gives w_i = exp ℓ_i / Σ_{S_t} exp ℓ_j (the stock top-|S_t| result).
   - ``sigmoid_grouped`` (DeepSeek-V3, GLM-4.5): its logit is -inf, so its sigmoid score s = 0 and its gate weight
     0; the group-masked selection scores (the router's ``masked_fill`` output) are the lowest finite value outside
     S_t, so top-k takes S_t whatever the group scores became; w_i = s_i (÷ Σ_{S_t} s + 1e-20 with
     ``norm_topk_prob``) × scaling. Lowest finite, not -inf, and an entry that was -inf before the op stays -inf:
     under `masking.masked_experts` (the reference of an export with experts removed) a removed expert's selection
     score is -inf (the group mask may have turned it into 0), and the slots top-k fills beyond S_t must go to
     dropped experts (s = 0, weight 0), not to removed ones (s = -inf, which poisons the renormalisation with NaN;
     it did for 11–14 of 64 tokens on the tiny deepseek_v3 after 25 % removal, and the check below refused).
   - ``sigmoid_topk``: its logit is -inf (σ = 0; a biased top-k over logits never ranks it above S_t).

   When |S_t| < k the model's top-k still fills k slots: the extra slots hold dropped experts **with weight 0**.
   The hook then checks (every call) that the experts with non-zero weight are exactly S_t (all of S_t selected,
   nothing outside it weighted: a kept weight may underflow to 0 in float16) — a family whose code
   does something else (e.g. a selection bias that lifts a zero-probability expert into the top-k) raises
   MoePruneError instead of routing silently wrong — and, where the experts module skips the index E (transformers'
   fused experts: ``one_hot(..., num_classes=E + 1)`` with ``if expert_idx == num_experts: continue``, and the
   grouped_mm / batched_mm kernels' EP sentinel), rewrites those slots' indices to E so the eager path really
   skips them. That holds only while the experts run transformers' eager loop (`model.set_experts_implementation(
   "eager")`; the grouped_mm / batched_mm kernels, transformers' default here, take a sentinel only under expert
   parallelism, `sentinel_active`): with those kernels, and in gpt-oss (whose experts module takes no sentinel),
   the weight-0 slots are still computed — the output is right, the work is not lower. `LayerCounter.skipped`
   counts the slots really skipped.

Calls in which the policy keeps every selected expert are returned as they are (one router pass), so a policy that
keeps everything (e.g. top-k with k = the model's k) is bit-exact.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import _OPS

# kind -> (op, how): the router ops whose outputs [N, E] are masked per row in the second pass
POLICY_OPS: dict[str, tuple[tuple[str, str], ...]] = {
    "softmax_topk": (("softmax", "zero"),),
    "softmax_grouped": (("softmax", "zero"),),
    "softmax_bias": (("softmax", "zero"),),
    "topk_softmax": (("linear", "neg_inf"),),
    "sigmoid_topk": (("linear", "neg_inf"),),
    "sigmoid_grouped": (("linear", "neg_inf"), ("masked_fill", "lowest")),
}
_NAMES = {**_OPS, "masked_fill": {"masked_fill"}}
LOGIT_OPS = (("linear", "neg_inf"),)

# (w [N, k] router weights, sel [N, k] selection scores, layer) -> keep [N, k] bool (at least one per row)
# A decide with `takes_input = True` is called (w, sel, layer, x [N, H]) with the router's input hidden states
# (a learned selector such as OTP's, `routing/otp.py`).
Decide = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class _RowMask(TorchFunctionMode):
    """Outputs of the named ops with last dim C and N rows: entries where `keep` [N, C] is False become 0 / -inf."""

    def __init__(self, ops: tuple[tuple[str, str], ...], keep: torch.Tensor):
        super().__init__()
        self.how = {name: how for op, how in ops for name in _NAMES[op]}
        self.keep = keep  # [N, C] bool
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        how = self.how.get(getattr(func, "__name__", ""))
        N, C = self.keep.shape
        if how is not None and isinstance(out, torch.Tensor) and out.shape[-1] == C and out.numel() == N * C:
            self.hits += 1
            drop = ~self.keep.to(out.device).view(out.shape)
            if how != "lowest":
                return out.masked_fill(drop, 0.0 if how == "zero" else float("-inf"))
            out = out.masked_fill(drop, torch.finfo(out.dtype).min)
            src = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].shape == out.shape else None
            if src is not None:  # an entry already -inf before the op (an expert masked out of routing) stays so
                out = out.masked_fill(drop & torch.isneginf(src), float("-inf"))
            return out
        return out


@dataclass
class LayerCounter:
    """Tokens routed through one layer's router and the experts they used (non-zero weight) before/after."""

    tokens: int = 0
    selected: int = 0  # Σ_t |T_t| (the model's own top-k)
    active: int = 0  # Σ_t |S_t|
    calls: int = 0
    masked_calls: int = 0  # calls that needed the second (masked) pass
    skipped: int = 0  # weight-0 slots handed to the experts as the sentinel E (not computed)


@dataclass
class Installed:
    handles: list = field(default_factory=list)
    counters: dict[int, LayerCounter] = field(default_factory=dict)
    skips_unrouted: dict[int, bool] = field(default_factory=dict)  # the experts module can skip the sentinel
    plan: Any = None  # what was installed (`routing.plan.RoutingPlan`), for reports

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _split_output(out, logits_at: int) -> tuple[torch.Tensor, int, int]:
    """(logits [N, C], position of the gate weights [N, k], position of the expert indices [N, k]) in a router's
    output tuple."""
    if not isinstance(out, tuple):
        raise MoePruneError("routing policies read the router's (logits, weights, indices) output, but this router "
                            f"returns one {type(out).__name__}: its top-k happens outside the router module.")
    logits = out[logits_at]
    idx_at = [i for i, t in enumerate(out) if isinstance(t, torch.Tensor) and not t.is_floating_point()
              and t.dim() == 2]
    if len(idx_at) != 1:
        raise MoePruneError("routing policies need a router output with one integer [N, k] tensor of expert "
                            f"indices; this one holds {[getattr(t, 'shape', type(t)) for t in out]}.")
    idx = out[idx_at[0]]
    w_at = [i for i, t in enumerate(out) if i != logits_at and isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.shape == idx.shape]
    if len(w_at) != 1:
        raise MoePruneError("routing policies need a router output with one float [N, k] tensor of gate weights "
                            f"next to the indices; this one holds {[getattr(t, 'shape', type(t)) for t in out]}.")
    return logits, w_at[0], idx_at[0]


def selection_scores(kind: str, logits: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """σ [N, k]: what the router ranks the selected experts by (top-k keeps the k' largest of these).

    softmax kinds and gpt-oss rank by the logits (softmax is monotone); ``sigmoid_grouped`` by σ(ℓ) + correction
    bias; ``softmax_bias`` by softmax(ℓ) + bias; ``sigmoid_topk`` by ℓ (+ its selection bias)."""
    ell = logits.float().reshape(-1, logits.shape[-1])  # [N, C]
    if kind == "sigmoid_grouped":
        score = ell.sigmoid()
    elif kind == "softmax_bias":
        score = ell.softmax(dim=-1)
    else:
        score = ell
    if bias is not None:
        score = score + bias.float().to(score.device)
    return score.gather(1, idx)  # [N, k]


def selection_bias(adapter: MoEAdapter, block: nn.Module) -> Callable[[], torch.Tensor] | None:
    """The selection (correction) bias [C] of a routing kind that has one, found and read when called, else None.
    A lazily loaded layer is on meta until materialised, with the original expert count: only then (and after the
    earlier recipe stages are applied to it) does the router hold the bias `router_tensors` can name. A materialised
    block is checked here already, so a family whose bias cannot be told apart is refused before any forward."""
    if not adapter.routing().correction_bias:
        return None

    def read() -> torch.Tensor:
        tensors = adapter.router_tensors(block)
        named = [n for n in tensors if n.endswith(("correction_bias", "expert_bias"))]
        if len(named) != 1:
            raise MoePruneError(f"{adapter.family}: cannot tell the selection bias among the router tensors "
                                f"{list(tensors)}.")
        return tensors[named[0]].reshape(-1)

    if not any(t.is_meta for t in adapter.router(block).parameters()):
        read()
    return read


def skips_sentinel(experts: nn.Module) -> bool:
    """True when the experts module skips expert index E (see the module docstring)."""
    try:
        src = inspect.getsource(inspect.unwrap(type(experts).forward))
    except (OSError, TypeError):
        return False
    return "num_experts + 1" in src and "== self.num_experts" in src


def sentinel_active(experts: nn.Module) -> bool:
    """True when the experts' *current* implementation skips the sentinel: transformers' eager loop (config
    `_experts_implementation` "eager" or unset), or the grouped_mm / batched_mm kernels under expert parallelism.
    The grouped_mm / batched_mm kernels without expert parallelism (transformers' default on this machine) read
    uninitialised rows for a sentinel, so there the weight-0 slots are left to be computed."""
    cfg = getattr(experts, "config", None)
    impl = getattr(cfg, "_experts_implementation", None) if cfg is not None else None
    return impl in (None, "eager") or bool(getattr(experts, "_is_expert_parallel", False))


def install_policy(model: nn.Module, adapter: MoEAdapter, decide: Decide, layers: list[int] | None = None,
                   check: bool = True) -> Installed:
    """Hook the routers of `layers` (default: every MoE layer) with `decide`; returns the handles and counters.

    Remove with `.remove()`. The hooks compose with `masking.masked_experts` (which patches `router.forward`: the
    second pass calls the patched forward, so pruned experts stay masked)."""
    spec = adapter.routing()
    ops = POLICY_OPS[spec.kind]
    inst = Installed()
    Z = adapter.extra_classes
    for layer in adapter.moe_layers() if layers is None else layers:
        block = adapter.block(model, layer)
        router, experts = adapter.router(block), adapter.experts(block)
        bias = selection_bias(adapter, block)
        sentinel = Z == 0 and skips_sentinel(experts)
        counter = inst.counters[layer] = LayerCounter()
        inst.skips_unrouted[layer] = sentinel
        hook = _make_hook(layer, spec.kind, ops, adapter.router_logits_at, bias, decide, counter, sentinel,
                          experts, check)
        inst.handles.append(router.register_forward_hook(hook, with_kwargs=True))
    return inst


def _make_hook(layer, kind, ops, logits_at, bias, decide, counter, sentinel, experts, check):
    def hook(module, args, kwargs, out):
        logits, w_at, idx_at = _split_output(out, logits_at)
        w, idx = out[w_at], out[idx_at]  # [N, k]
        N, k = idx.shape
        C = logits.shape[-1]
        sel = selection_scores(kind, logits, idx, None if bias is None else bias()[:C])
        if getattr(decide, "takes_input", False):
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            keep_slot = decide(w.detach(), sel, layer, x.reshape(N, -1)).to(idx.device)  # [N, k] bool
        else:
            keep_slot = decide(w.detach(), sel, layer).to(idx.device)  # [N, k] bool
        if not bool(keep_slot.any(dim=-1).all()):
            raise MoePruneError(f"layer {layer}: the routing policy kept no expert for some token.")
        n_keep = int(keep_slot.sum())
        counter.calls += 1
        counter.tokens += N
        counter.selected += N * k
        counter.active += n_keep
        if n_keep == N * k:
            return out
        keep = torch.zeros(N, C, dtype=torch.bool, device=idx.device)
        keep.scatter_(1, idx, keep_slot)  # [N, C]: S_t
        mode = _RowMask(ops, keep)
        with mode:
            out2 = module.forward(*args, **kwargs)
        if mode.hits == 0 and ops[0][0] == "softmax":  # no width-E softmax: top-k on the logits, then a softmax
            mode = _RowMask(LOGIT_OPS, keep)  # over the k selected (aria, granitemoe): mask the logits
            with mode:
                out2 = module.forward(*args, **kwargs)
        counter.masked_calls += 1
        w2, idx2 = out2[w_at], out2[idx_at]
        weighted = torch.zeros(N, C, dtype=torch.bool, device=idx2.device)
        weighted.scatter_(1, idx2, w2 != 0)  # experts with non-zero weight: all in S
        present = torch.zeros(N, C, dtype=torch.bool, device=idx2.device)
        present.scatter_(1, idx2, True)  # experts selected: all of S (a kept weight may underflow to 0 in fp16)
        wrong = (weighted & ~keep) | (keep & ~present)  # [N, C]
        if check and bool(wrong.any()):
            bad = int(wrong.any(dim=-1).sum())
            raise MoePruneError(f"layer {layer}: the router ({kind}) did not route {bad} of {N} tokens to exactly the "
                                f"experts the policy kept (masked ops {[op for op, _ in ops]} seen {mode.hits} "
                                "times): this family's router code needs another mask point (models/dynamic.py).")
        if sentinel and sentinel_active(experts):
            E = C  # no extra classes when the sentinel is used
            zero = w2 == 0
            counter.skipped += int(zero.sum())
            idx2 = torch.where(zero, torch.full_like(idx2, E), idx2)
        # the logits element stays the first pass's (no -inf of the mask leaks into e.g. an auxiliary loss)
        return tuple(idx2 if i == idx_at else out[i] if i == logits_at else t for i, t in enumerate(out2))

    return hook

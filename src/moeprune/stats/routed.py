"""Routed-expert statistics from the routing the model actually applies.

The collector wraps a MoE block's experts module (blocks that pre-scale the experts' input, llama4, are read
through `stats/prescaled.py`). The block calls it with the real routing — indices and
weights after softmax/sigmoid, correction bias, groups, renormalisation and scaling — so nothing is recomputed.
For the T·k (token, slot) pairs it calls the model's own experts code once with one-hot routing (weight 1), which
returns f_j(t), expert j's output before the gate multiply, for every pair (transformers' grouped_mm kernel runs its
steps on the pairs directly: `stats/slots.py`) — the probe rows below ride in the same call, so the experts' loop
runs once per batch; the block output is then rebuilt as r_t = Σ_slots g·f (same experts
work as the normal forward, summed in another order). A forward hook on the
router keeps its logits for the router-probability statistics.

Per expert j, over non-padding tokens t (A_j = tokens routed to j; h_t = the MoE block input; float64 sums):
    count = |A_j|,  gate_sum = Σ_{A_j} g_j(t),  norm_sum = Σ_{A_j} ‖f_j(t)‖,  sq_norm_sum = Σ_{A_j} ‖f_j(t)‖²,
    gate_norm_sum = Σ_{A_j} g_j(t)·‖f_j(t)‖,  max_abs = max_{A_j} max |f_j(t)|,
    easy_ep_sum = Σ_{A_j} g_j(t)·‖f_j(t)‖·max(0, 1 − cos(h_t, h_t + r_t))                       (EASY-EP)
    prob_sum = Σ_t p_j(t),  prob_topk_sum = Σ_{A_j} p_j(t),  prob_top1_sum = Σ_t p_j(t)·1[j = argmax p(t)]
    coact[i, j] = #{t : i ∈ TopK(t) and j ∈ TopK(t)}  (diagonal = count),  tokens = #{t}
p(t) is the router's distribution over all E experts: softmax(logits) for softmax routers, σ(logits)/Σσ(logits)
for sigmoid routers (TCESS, PreMoe).

Grouping statistics for expert merging (sums too, so they merge by addition like the rest):
    logit_gram[i, j] = Σ_t ℓ_i(t)·ℓ_j(t)   (router logits; cos of logit columns = M-SMoE similarity)
and, on *probe tokens* P (every `probe_stride`-th real token of each sequence, counted from its first real token,
so the sample does not depend on batching or padding), EVERY expert's output, routed or not:
    out_sum[j] = Σ_{t∈P} f_j(t)  [E, H]   (mean output: HC-SMoE),   out_gram[i, j] = Σ_{t∈P} f_i(t)·f_j(t)
    (cos of the concatenated outputs: Sub-MoE),   probe_tokens = |P|.
Probing costs E·|P| extra expert rows, ≈ T·k/8 with the default stride ⌈8E/k⌉ (an eighth of the routed work).

Extra router classes (LongCat-Flash's Z identity "zero experts", router classes E..E+Z-1 without weights) are not
experts: a slot routed to one adds to no expert's sums (nor to coact), its output still counts in r_t, and the
router's distribution p and logits are those of the E experts (the first E columns of the E + Z).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.models.forward_patch import forward_set
from moeprune.models.layouts import fused_rows
from moeprune.stats.block_routes import BlockRoutes
from moeprune.stats.prescaled import BlockInput, dense_scores, is_prescaled
from moeprune.stats.slot_sums import dot_terms, peak_and_norm, weighted_sum
from moeprune.stats.slots import slot_outputs, uses_grouped_mm

EXPERT_FIELDS = ("count", "gate_sum", "norm_sum", "sq_norm_sum", "gate_norm_sum", "max_abs", "easy_ep_sum",
                 "prob_sum", "prob_topk_sum", "prob_top1_sum")
GROUPING_FIELDS = ("logit_gram", "out_sum", "out_gram", "probe_tokens")  # absent from files before merging existed
FIELDS = (*EXPERT_FIELDS, "coact", "tokens", *GROUPING_FIELDS)
MAX_FIELDS = frozenset({"max_abs"})  # merged by max; every other field by addition
PAIR_SUMS = ("count", "gate_sum", "norm_sum", "sq_norm_sum", "gate_norm_sum", "easy_ep_sum", "prob_topk_sum")


def field_shape(name: str, num_experts: int, hidden: int = 0) -> tuple[int, ...]:
    """Shape of a field; out_sum is [E, H] with H known once outputs were seen ([E, 0] before)."""
    E = num_experts
    return {"coact": (E, E), "logit_gram": (E, E), "out_gram": (E, E), "out_sum": (E, hidden),
            "tokens": (1,), "probe_tokens": (1,)}.get(name, (E,))


def default_probe_stride(num_experts: int, top_k: int) -> int:
    """⌈8E/k⌉: probing every expert on 1/stride of the tokens costs an eighth of the routed expert work."""
    return max(1, -(-8 * num_experts // max(1, top_k)))


def probe_mask(attention_mask: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, S] attention mask -> [B·S] bool: real tokens whose index among their row's real tokens is 0 mod stride."""
    m = attention_mask.bool()
    pos = m.long().cumsum(dim=1) - 1  # [B, S] index among the row's real tokens
    return (m & (pos % stride == 0)).reshape(-1)


@dataclass
class RoutedStats:
    """Sums for one MoE layer: [E] float64 per expert field, coact/logit_gram/out_gram [E, E], out_sum [E, H],
    tokens/probe_tokens [1]."""

    num_experts: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: int = 0  # H of out_sum; 0 = not known yet (set by the first probe batch)

    def __post_init__(self) -> None:
        for name in FIELDS:
            self.sums.setdefault(name, torch.zeros(field_shape(name, self.num_experts, self.hidden),
                                                   dtype=torch.float64))

    def to(self, device: torch.device | str) -> RoutedStats:
        """The sums on `device`, moved as one float64 buffer: one host-device copy (and sync) per layer instead of
        one per field; each field is its own tensor again afterwards (safetensors refuses shared storage)."""
        target = torch.device(device)
        if all(v.device.type == target.type and target.index in (None, v.device.index) for v in self.sums.values()):
            return self
        self.sums = moved_together(self.sums, target)
        return self

    @property
    def has_probes(self) -> bool:
        return bool(self.sums["probe_tokens"].item() > 0)

    def update_grouping(self, logits: torch.Tensor | None, valid: torch.Tensor, probe_out: torch.Tensor | None) -> None:
        """logits: [T, E] router logits (None: not collected); valid: [T] bool; probe_out: [P, E, H] every expert's
        output on the probe tokens (None: no probe token in this batch). No host-device sync."""
        s = self.sums
        if logits is not None:
            lg = logits.double() * valid.to(logits.device, torch.float64, non_blocking=True)[:, None]  # [T, E]
            s["logit_gram"].addmm_(lg.T, lg)  # [E, E]
        if probe_out is not None and probe_out.shape[0]:
            P, E, H = probe_out.shape
            fp = probe_out.double().reshape(P, E * H)  # [P, E·H]
            if s["out_sum"].shape[1] != H:
                if s["out_sum"].shape[1]:
                    raise ValueError(f"probe outputs of width {H} added to sums of width {s['out_sum'].shape[1]}")
                s["out_sum"] = torch.zeros(E, H, dtype=torch.float64, device=fp.device)
            s["out_sum"] += fp.sum(dim=0).view(E, H)
            fe = fp.view(P, E, H).transpose(0, 1).reshape(E, P * H)  # [E, P·H]
            s["out_gram"].addmm_(fe, fe.T)  # [E, E] = Σ_p f_i(p)·f_j(p)
            s["probe_tokens"] += P

    def update(self, idx: torch.Tensor, gate: torch.Tensor, f: torch.Tensor, valid: torch.Tensor,
               h: torch.Tensor, probs: torch.Tensor | None, r: torch.Tensor | None = None) -> None:
        """idx, gate: [T, k]; f: [T, k, H] expert outputs; valid: [T] bool (False on padding);
        h: [T, H] MoE block input; probs: [T, E] router distribution (None: router stats not collected);
        r: [T, H] routed output Σ_k g·f when the caller has it already.

        Per-element work on [T, k, H] stays in float32 (norms, maxima; the collector also computes the router
        distribution [T, E] in float32: relative rounding ~1e-7 per token); the EASY-EP cosine is float64 on
        [T, H]; per-pair results are summed in float64, the PAIR_SUMS by one scatter_add of [7, T·k] columns.
        Padding rows get weight 0 (no copies). Every op is a device op: no host-device sync."""
        E, s = self.num_experts, self.sums
        T, k = idx.shape
        w = valid.to(idx.device, torch.float64, non_blocking=True)  # [T] 1 = real token
        expert = idx < E  # [T, k] False on slots routed to an extra router class (a zero expert)
        idx = torch.where(expert, idx, 0)  # [T, k] such slots get weight 0 below
        if r is None:
            r = weighted_sum(f, gate)  # [T, H]
        wk = w[:, None] * expert  # [T, k] 1 = a real token's slot routed to an expert
        peak, norm = peak_and_norm(f)  # [T, k] each (`slot_sums`: a few rows at a time on the CPU)
        peak = peak * wk  # max |f|; 0 neutral
        hh, hr, rr = dot_terms(h, r)  # [T] each: 1 − cos is a small difference of numbers near 1, so float64
        eps = torch.finfo(torch.float64).eps  # as F.cosine_similarity: each norm clamped at eps
        cos = (hh + hr) / ((hh.sqrt().clamp_min(eps)) * (hh + 2 * hr + rr).clamp_min(0).sqrt().clamp_min(eps))
        novelty = (1 - cos).clamp_min(0) * w  # [T]
        g = gate.double() * wk  # [T, k] gate, 0 on padding and zero-expert slots
        gn = g * norm  # [T, k]
        cols = [wk, g, norm * wk, norm.square() * wk, gn, gn * novelty[:, None]]  # per (token, slot) pair
        if probs is not None:
            p = probs.double() * w[:, None]  # [T, E]
            cols.append(p.gather(1, idx) * expert)  # [T, k] p_j(t) of the routed experts
        j = idx.reshape(-1)  # [M = T·k]
        C = len(cols)
        per = torch.zeros(C, E, dtype=torch.float64, device=idx.device)
        per.scatter_add_(1, j.expand(C, -1), torch.stack(cols).view(C, -1))  # [6 or 7, E]
        for c, name in enumerate(PAIR_SUMS[:C]):
            s[name] += per[c]
        if j.numel():  # shape only: no sync
            s["max_abs"] = s["max_abs"].scatter_reduce(0, j, peak.reshape(-1), reduce="amax")
        pair = (idx[:, :, None] * E + idx[:, None, :]).reshape(-1)  # [T·k·k] flat (i, j) of co-routed experts
        weight = (wk[:, :, None] * expert[:, None, :]).reshape(-1)  # [T·k·k] both slots routed to experts
        s["coact"].view(-1).index_add_(0, pair, weight)  # exact integer counts (bincount would sync on CUDA)
        s["tokens"] += w.sum()
        if probs is not None:
            s["prob_sum"] += p.sum(dim=0)
            best = p.max(dim=-1)  # [T] each: the top-1 probability and its expert
            s["prob_top1_sum"].index_add_(0, best.indices, best.values)

    def merge(self, other: RoutedStats) -> RoutedStats:
        """Statistics of the union of both data sets (sums add, maxima take the max)."""
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge stats of {self.num_experts} and {other.num_experts} experts")
        out = RoutedStats(self.num_experts)
        for name in FIELDS:
            a, b = self.sums[name], other.sums[name].to(self.sums[name].device)
            if name == "out_sum" and a.shape != b.shape and 0 in (a.shape[1], b.shape[1]):
                out.sums[name] = (b if a.shape[1] == 0 else a).clone()  # the side that never saw a probe is [E, 0]
                continue
            op = torch.maximum if name in MAX_FIELDS else torch.add
            out.sums[name] = op(a, b)
        return out


def packed(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors of one dtype -> one flat buffer [Σ numel] (one copy or one collective for all of them)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unpacked(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`packed`'s inverse: the pieces of `flat` in the shapes of `like`, each its own tensor (safetensors refuses
    shared storage)."""
    parts = flat.split([t.numel() for t in like])
    return [p.view(t.shape).clone() for p, t in zip(parts, like, strict=True)]


def moved_together(sums: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Float64 tensors on `device` through one buffer (one copy), each its own tensor afterwards."""
    values = list(sums.values())
    return dict(zip(sums, unpacked(packed(values).to(device), values), strict=True))


def router_probs(logits: torch.Tensor, kind: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[T, E] logits -> [T, E] distribution over experts (see module docstring), computed in `dtype`."""
    if kind in ("sigmoid_grouped", "sigmoid_topk"):
        scores = torch.sigmoid(logits.to(dtype))
        return scores / scores.sum(dim=-1, keepdim=True)
    return torch.softmax(logits.to(dtype), dim=-1)


class RoutedCollector:
    """Context manager: while active, the experts module's forward (and the router's logits) feed `stats`.

    `valid` must be set to the current batch's flattened non-padding mask [T] before each forward (on the device,
    or on the host: it is copied without blocking), and `probe` to its probe-token mask [T] (`probe_mask`; None: no
    probes), kept on the host so that its indices are found without a device sync. With `router=None` the
    router-probability and logit fields stay zero. Routing traces: when `trace` is a list and `rows` the batch's
    [B, S] attention mask, each forward appends one LongTensor [n_real, k] per row — its real tokens' expert
    indices, in order.
    """

    def __init__(self, experts: nn.Module, stats: RoutedStats, router: nn.Module | None = None,
                 routing_kind: str = "softmax_topk", *, block: nn.Module | None = None, top_k: int | None = None,
                 logits_at: int = 0, extra_classes: int = 0):
        self.experts, self.stats, self.router, self.kind = experts, stats, router, routing_kind
        self.classes = stats.num_experts + extra_classes  # router classes: E experts, then Z without weights
        # the experts module itself serves the extra classes (transformers 5.24 LongCat-Flash: its input projection
        # has E + Z rows); where the block serves them (5.25), class E is no expert of the module's own
        rows = fused_rows(experts) if not isinstance(experts, nn.ModuleList) else None
        self.extra_in_experts = self.classes > stats.num_experts and rows is not None and rows[1] > rows[0]
        self.logits_at = logits_at  # which element of the router's output tuple holds the logits [T, E]
        self.prescaled = is_prescaled(experts)  # the block pre-scales the experts' input (`stats/prescaled.py`)
        if self.prescaled and (block is None or top_k is None):
            raise ValueError(f"{type(experts).__name__} takes pre-scaled inputs: the collector needs the block and "
                             "top_k to read the routing off its call")
        self.top_k = top_k
        self._input = BlockInput(block) if self.prescaled else None
        self.valid: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None
        self.layer = -1  # decoder-layer index, for callers that switch `stats` per batch
        self.trace: list[torch.Tensor] | None = None  # routing traces of the current set (None: not recorded)
        self.rows: torch.Tensor | None = None  # [B, S] attention mask of the current batch, for `trace`
        # when a list: each forward appends (idx [r, k], f [r, k, H]) for the rows `keep_rows` [r] (long, on the
        # device) of the batch, their routed experts and outputs at gate weight 1 (NAEE's precompute copies them,
        # `select/naee_outputs.expert_outputs(known=...)`); not recorded for pre-scaled inputs or router classes
        # without experts
        self.keep_slots: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.keep_rows: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._hook = None
        self._routes = BlockRoutes(router, stats.num_experts, extra_classes)  # zero experts the block holds

    def _keep_logits(self, module, args, output) -> None:
        logits = output[self.logits_at] if isinstance(output, tuple) else output
        n = self.classes  # E + Z
        if not isinstance(logits, torch.Tensor) or logits.shape[-1] != n:
            raise RuntimeError(f"router {type(module).__name__} did not return [T, {n}] logits first")
        self._logits = logits.detach().reshape(-1, n)  # [T, E + Z]

    def __enter__(self) -> RoutedCollector:
        original = self.experts.forward
        if self.router is not None:
            self._hook = self.router.register_forward_hook(self._keep_logits)
        self._routes.__enter__()

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            T, k = top_k_index.shape
            shape = hidden_states.shape  # [T, H], or [B, S, H] (DBRX hands its experts unflattened states)
            hidden_states = hidden_states.reshape(T, shape[-1])  # [T, H]
            dev = hidden_states.device
            token = torch.arange(T, device=dev).repeat_interleave(k, output_size=T * k)  # [T·k]: (token, slot)
            experts = top_k_index.reshape(-1, 1)  # [T·k, 1]
            probe = self._probe_rows(dev)  # [P] token indices (None: no probe token in this batch)
            if probe is not None:  # every expert on each probe token, in the same call (one pass over the experts)
                E, P = self.stats.num_experts, probe.shape[0]
                token = torch.cat([token, probe.repeat_interleave(E, output_size=P * E)])  # [T·k + P·E]
                every = torch.arange(E, device=dev).repeat(P).view(-1, 1)  # [P·E, 1]
                experts = torch.cat([experts, every.to(experts.dtype)])  # [T·k + P·E, 1]
            if self.classes == self.stats.num_experts and not (args or kwargs) and uses_grouped_mm(self.experts):
                fa = slot_outputs(self.experts, hidden_states, token, experts.view(-1)).detach()  # [T·k (+ P·E), H]
            else:
                fa = self._one_slot_per_row(original, hidden_states, token, experts, top_k_weights, args, kwargs)
            f = fa[: T * k].view(T, k, -1)  # [T, k, H]
            if self.keep_slots is not None and self.keep_rows is not None and self.classes == self.stats.num_experts:
                rows = self.keep_rows.to(dev, non_blocking=True)  # [r]
                self.keep_slots.append((top_k_index.detach().reshape(T, k).index_select(0, rows),
                                        f.index_select(0, rows)))  # copies: the batch's [T, k, H] is not held
            probe_out = fa[T * k :].view(-1, self.stats.num_experts, fa.shape[-1]) if probe is not None else None
            valid = self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool, device=dev)
            valid = valid.to(dev, non_blocking=True)
            logits, self._logits = self._logits, None
            probs = router_probs(logits, self.kind, torch.float32) if logits is not None else None
            if logits is not None:  # the E experts' columns of the E + Z router classes
                logits, probs = logits[:, : self.stats.num_experts], probs[:, : self.stats.num_experts]
            out = weighted_sum(f, top_k_weights)  # [T, H]
            # the routes the block chose: a zero-expert slot it handles itself counts as that class, not as the
            # dummy expert at weight 0 it hands the experts (`stats/block_routes.py`)
            idx, gate, _ = self._routes.resolve(top_k_index, top_k_weights.detach())
            self.stats.to(dev).update(idx, gate, f, valid, hidden_states.detach(), probs, out)
            self.stats.update_grouping(logits, valid, probe_out)
            if self.trace is not None:
                self._record_trace(idx)
            return out.view(shape)

        self._patch = forward_set(self.experts, self._prescaled_forward(original) if self.prescaled
                                  else forward)  # the experts' forward back as it was on exit
        self._patch.__enter__()
        return self

    def _one_slot_per_row(self, original, hidden_states: torch.Tensor, token: torch.Tensor, experts: torch.Tensor,
                          top_k_weights: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """f for the pairs (token[m], experts[m]) from the model's own experts code, called with one slot per row at
        weight 1: [M, H]."""
        rows = hidden_states.index_select(0, token)  # [M, H]: one gather, no intermediate copies
        one = torch.ones(rows.shape[0], 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
        if self.extra_in_experts:  # a second slot at weight 0 on the first extra class (an identity zero
            # expert, no work): 5.24 LongCat-Flash's experts code cannot take one slot per row. Not where the
            # block serves them: there class E is out of the experts' range (grouped_mm leaves such rows unset)
            experts = torch.cat([experts, torch.full_like(experts, self.stats.num_experts)], dim=1)  # [M, 2]
            one = torch.cat([one, torch.zeros_like(one)], dim=1)  # [M, 2]: f·1 + x·0 = f exactly
        return original(rows, experts, one, *args, **kwargs).detach().reshape(rows.shape)  # [M, H]

    def _prescaled_forward(self, original):
        """The experts' forward for a block that pre-scales their input (`stats/prescaled.py`): the model's own call
        runs unchanged; routing (top-k of the dense scores), f = o / g and the probes are read off it."""
        self._input.__enter__()

        def forward(routed_in, *args, **kwargs):
            out = original(routed_in, *args, **kwargs)  # [E·T, H] the block's own computation
            x = self._input.x  # [T, H]
            T, E, dev = x.shape[0], self.stats.num_experts, x.device
            per = out.detach().view(E, T, -1)  # [E, T, H]: o_e(t) = f_e(s_e(t)·x_t)
            g, idx = dense_scores(routed_in, x).topk(self.top_k, dim=-1)  # [T, k] each
            o = per[idx, torch.arange(T, device=dev)[:, None]]  # [T, k, H]
            f = o / g.clamp_min(torch.finfo(torch.float64).tiny)[..., None].to(o.dtype)  # [T, k, H]
            probe = self._probe_rows(dev)  # [P] (None: no probe token)
            probe_out = None
            if probe is not None:  # every expert at weight 1 on the probe tokens: input rows x_p for each expert
                rows = x.index_select(0, probe).repeat(E, 1)  # [E·P, H]
                probe_out = original(rows, *args, **kwargs).detach().view(E, probe.shape[0], -1).transpose(0, 1)
            valid = self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool, device=dev)
            valid = valid.to(dev, non_blocking=True)
            logits, self._logits = self._logits, None
            probs = router_probs(logits, self.kind, torch.float32) if logits is not None else None
            self.stats.to(dev).update(idx, g, f, valid, x, probs, per.sum(dim=0))
            self.stats.update_grouping(logits, valid, probe_out)
            if self.trace is not None:
                self._record_trace(idx)
            return out

        return forward

    def _record_trace(self, top_k_index: torch.Tensor) -> None:
        """Append each row's real-token routing [n_real, k] (int64, CPU) to `trace` (a device->host copy: traces
        are for routing analysis, not the statistics path)."""
        if self.rows is None:
            raise RuntimeError("routing traces need `rows`, the batch's [B, S] attention mask")
        rows = self.rows.bool().cpu()  # [B, S]
        idx = top_k_index.detach().cpu().long().view(*rows.shape, -1)  # [B, S, k]
        self.trace.extend(idx[b][rows[b]].clone() for b in range(rows.shape[0]))

    def _probe_rows(self, device: torch.device) -> torch.Tensor | None:
        """[P] indices of the probe tokens on `device`, or None without any. The mask is turned into indices where
        it lives (on the host, as the session passes it: no sync), then copied without blocking."""
        if self.probe is None:
            return None
        where = self.probe.nonzero().view(-1)  # [P]
        if where.shape[0] == 0:
            return None
        if device.type == "cuda":
            where = where.pin_memory()  # an asynchronous copy needs page-locked memory
        return where.to(device, non_blocking=True)

    def __exit__(self, *exc) -> None:
        self._patch.__exit__(None, None, None)
        self._routes.__exit__()
        if self._input is not None:
            self._input.__exit__()
        if self._hook is not None:
            self._hook.remove()
        self.stats.to("cpu")

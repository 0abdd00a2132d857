"""Per-neuron statistics inside routed experts, for CAMERA-P and HEAPr — one instrumented pass over the model.

Neuron ("atomic expert") k of expert j: row k of the gate and up projections and column w_k = down[:, k]. For a
token t routed to j with routing weight ĝ_j(t) and input x_t, the activation entering the down projection is
h_{t,k} = glu(gate_k·x_t, up_k·x_t) (the family's own activation, `MoEAdapter.expert_glu`), and the expert's
output is y_t = W_down h_t (+ bias). Sums run over routed, non-padding tokens (A_j, N_j = |A_j|):

    act_sq[j, k]   = Σ_{A_j} h_{t,k}²                       (HEAPr's x_k² term)
    gact_sq[j, k]  = Σ_{A_j} (ĝ_j(t) · h_{t,k})²             (CAMERA-P energy)
    gact_max[j, k] = max_{A_j} (ĝ_j(t) · h_{t,k})²           (CAMERA-P peak)
    grad_sq[j, k]  = Σ_{A_j} (∂L/∂h_{t,k})²                  (HEAPr, gradient pass only)
    down_sq[j, k]  = ‖w_k‖²                                  (weights, recorded once)
    in_sq[j, i]    = Σ_{A_j} x_{t,i}²                       [E, H]: the input-feature norms of gate/up (Wanda)

HEAPr needs w_kᵀ M_j w_k with M_j = (1/N_j) Σ_t g_t g_tᵀ and g_t = ∂L/∂y_t. Since ∂L/∂h_t = W_downᵀ g_t,
w_kᵀ M_j w_k = (1/N_j) Σ_t (w_kᵀ g_t)² = grad_sq[j, k] / N_j: the H×H matrices are never formed. Statistics
memory is 5 · E · I float64 per MoE layer (Qwen3-30B-A3B: 48 · 128 · 768 · 5 · 8 B ≈ 190 MB), independent of H;
the gradient pass itself holds one batch's activations, as any backward does. L is the *summed* next-token NLL
over the batch's counted positions, so each token's gradient is its own (not divided by the batch size). Its
gradient at the last decoder layer's output comes from the model's own head a chunk of positions at a time
(`stats/head_gradient.py`), then flows back through the layers: the [B, S, V] logits are never whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import InitVar, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moeprune.calibration.data import CalibSet
from moeprune.calibration.engine import last_hidden
from moeprune.calibration.session import eager_experts
from moeprune.errors import MoePruneError
from moeprune.io.kernel_cache import pad_rows
from moeprune.models.base import MoEAdapter
from moeprune.models.forward_patch import forward_set
from moeprune.models.layouts import FlatLayout, FusedLayout, layout_of
from moeprune.stats.block_routes import BlockRoutes
from moeprune.stats.head_gradient import nll_gradient
from moeprune.stats.prescaled import BlockInput, dense_scores, is_prescaled

FIELDS = ("act_sq", "gact_sq", "gact_max", "grad_sq", "down_sq")
MAX_FIELDS = {"gact_max"}


@dataclass
class NeuronLayerStats:
    num_experts: int
    width: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: int = 0  # H: in_sq [E, H] is kept when > 0
    device: InitVar[torch.device | str] = "cpu"  # where new sums live (the experts' device: no host sync per batch)

    def __post_init__(self, device: torch.device | str) -> None:
        E, I = self.num_experts, self.width
        for name in FIELDS:
            self.sums.setdefault(name, torch.zeros(E, I, dtype=torch.float64, device=device))
        if self.hidden:
            self.sums.setdefault("in_sq", torch.zeros(E, self.hidden, dtype=torch.float64, device=device))
        for name in ("count", "grad_count"):
            self.sums.setdefault(name, torch.zeros(E, dtype=torch.float64, device=device))

    def to(self, device: torch.device | str) -> NeuronLayerStats:
        return NeuronLayerStats(self.num_experts, self.width, {k: v.to(device) for k, v in self.sums.items()},
                                self.hidden)

    def update_forward(self, j: int, h: torch.Tensor, w: torch.Tensor, valid: torch.Tensor,
                       x: torch.Tensor | None = None) -> None:
        """h: [n, I] activations of expert j, w: [n] routing weights, valid: [n] 1.0 = real token, x: [n, H] the
        expert's input rows (in_sq)."""
        dev = self.sums["count"].device
        valid = valid.to(dev, torch.float64)  # [n]
        s = self.sums
        if x is not None and "in_sq" in s:
            s["in_sq"][j] += torch.mv(_squared(x, dev).t(), valid)  # Σ_t valid_t x_t²
        sq = _squared(h, dev)  # [n, I]
        s["count"][j] += valid.sum()
        s["act_sq"][j] += torch.mv(sq.t(), valid)  # Σ_t valid_t h_t²
        if sq.shape[0]:
            gsq = sq.mul_((w.to(dev, torch.float64).square() * valid)[:, None])  # [n, I] valid·(ĝ h)², in place
            s["gact_sq"][j] += gsq.sum(dim=0)
            s["gact_max"][j] = torch.maximum(s["gact_max"][j], gsq.amax(dim=0))

    def update_grad(self, j: int, grad: torch.Tensor, valid: torch.Tensor) -> None:
        """grad: [n, I] = ∂L/∂h for expert j's routed tokens."""
        s = self.sums
        grad, valid = grad.to(s["count"].device, torch.float64), valid.to(s["count"].device, torch.float64)
        s["grad_sq"][j] += (grad.square() * valid[:, None]).sum(dim=0)
        s["grad_count"][j] += valid.sum()

    def merge(self, other: NeuronLayerStats) -> NeuronLayerStats:
        out = {k: (torch.maximum(v, other.sums[k]) if k in MAX_FIELDS else v + other.sums[k])
               for k, v in self.sums.items() if k != "down_sq"}
        out["down_sq"] = self.sums["down_sq"]
        return NeuronLayerStats(self.num_experts, self.width, out, self.hidden)


def _squared(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t² in float64 on `device`, squared in place on the float64 copy (a new tensor when `t` already is one)."""
    t64 = t.to(device, torch.float64)
    return t64.square() if t64 is t else t64.mul_(t64)


def check_fused(adapter: MoEAdapter, model: nn.Module, layer: int) -> nn.Module:
    """Layer `layer`'s experts container, refused unless fused 3-D or flat (works on meta modules: nothing is read)."""
    experts = adapter.experts(adapter.block(model, layer))
    if layout_of(experts) not in (FusedLayout, FlatLayout):
        raise MoePruneError(f"layer {layer}: neuron statistics need fused 3-D or flat experts; this model keeps its "
                            f"experts as a {type(experts).__name__} of MLPs (not supported yet).")
    return experts


def column_sq(down: torch.Tensor) -> torch.Tensor:
    """[E, H, I] -> [E, I] float64: Σ_h down[e, h, i]², one expert at a time through one reused [H, I] float64
    buffer (the whole tensor in float64 would be 8·E·H·I bytes: 470 MB at E=128, H=1024, I=448). A fresh
    temporary per expert costs a page fault per page once freed memory goes back to the OS (`io/memory.py`):
    0.55 s per layer of the benchmark checkpoint that way, 0.03 s with the buffer, the same bits."""
    E, H, I = down.shape
    out = torch.empty(E, I, dtype=torch.float64, device=down.device)  # [E, I]
    buf = torch.empty(H, I, dtype=torch.float64, device=down.device)  # [H, I]
    for e in range(E):
        buf.copy_(down[e])
        buf.mul_(buf)
        torch.sum(buf, 0, out=out[e])
    return out


class NeuronCollector:
    """Context manager: every MoE layer's fused experts (or only `layers`' — the layer-by-layer path instruments
    the one materialised layer) run an instrumented eager forward that feeds `stats[layer]` (and, when the graph
    requires grad, registers hooks for ∂L/∂h). `inputs=False` leaves out in_sq (only Wanda reads it; [n, H] float64
    per expert and batch is the largest of the sums); `forward_sums=False` records only the gradient sums (a pass
    that recomputes a forward whose sums another pass already has: down_sq and the forward fields stay zero). Set
    `valid` ([T] bool, the flattened non-padding mask) before each forward. The forward is the family's eager
    computation written out with the canonical role views (`MoEAdapter.expert_roles`), so outputs match the stock
    module. Sums live on the experts' device."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, gradients: bool = False,
                 layers: list[int] | None = None, inputs: bool = True, forward_sums: bool = True):
        self.model, self.adapter, self.gradients, self.inputs = model, adapter, gradients, inputs
        self.forward_sums = forward_sums
        self.layers = adapter.moe_layers() if layers is None else layers
        self.valid: torch.Tensor | None = None
        self.stats: dict[int, NeuronLayerStats] = {}
        self._patches = ExitStack()  # the experts' forwards, each back as it was on exit (`forward_replaced`)
        self._inputs: list[BlockInput] = []
        self._routes: list[BlockRoutes] = []

    def __enter__(self) -> NeuronCollector:
        for layer in self.layers:
            block = self.adapter.block(self.model, layer)
            experts = check_fused(self.adapter, self.model, layer)
            down = self.adapter.expert_roles(block)["down"].detach()  # [E, H, I]
            stats = NeuronLayerStats(down.shape[0], down.shape[-1], hidden=down.shape[1] if self.inputs else 0,
                                     device=down.device)
            if self.forward_sums:
                stats.sums["down_sq"] = column_sq(down)  # [E, I]
            self.stats[layer] = stats
            if is_prescaled(experts):
                seen = BlockInput(block).__enter__()
                self._inputs.append(seen)
                forward = self._prescaled_for(block, experts, stats, seen)
            else:
                routes = BlockRoutes(self.adapter.router(block), self.adapter.num_experts,
                                     self.adapter.extra_classes).__enter__()
                self._routes.append(routes)
                forward = self._forward_for(block, experts, stats, routes)
            self._patches.enter_context(forward_set(experts, forward))
        return self

    def __exit__(self, *exc) -> None:
        self._patches.close()
        for seen in self._inputs:
            seen.__exit__()
        for routes in self._routes:
            routes.__exit__()
        self._inputs.clear()
        self._routes.clear()

    def _prescaled_for(self, block: nn.Module, experts: nn.Module, stats: NeuronLayerStats, seen: BlockInput):
        """Instrumented forward for a block that pre-scales the experts' input (`stats/prescaled.py`): each expert
        runs on its E·T-row share as the model does; tokens with a non-zero score are its routed tokens, and their
        activations h(s·x) enter the sums with weight 1 (the scaling is inside h)."""
        adapter, glu, E = self.adapter, self.adapter.expert_glu(experts), stats.num_experts

        def forward(routed_in, *args, **kwargs):
            roles = adapter.expert_roles(block)  # gate/up [E, I, H], down [E, H, I]
            x = seen.x  # [T, H]
            T = x.shape[0]
            routed = dense_scores(routed_in, x) > 0  # [T, E]
            rows = routed_in.view(E, T, -1)  # [E, T, H]
            valid = (self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool)).to(
                stats.sums["count"].device, torch.float64)  # [T]
            outs = []
            for j in range(E):
                g = (F.linear(rows[j], roles["gate"][j], roles["gate_bias"][j] if "gate_bias" in roles else None)
                     if "gate" in roles else None)  # [T, I]
                u = F.linear(rows[j], roles["up"][j], roles["up_bias"][j] if "up_bias" in roles else None)
                h = glu(g, u)  # [T, I]
                tok = routed[:, j].nonzero().view(-1).to(h.device)  # [n] routed tokens of j
                v = valid[tok.to(valid.device)]  # [n]
                if self.forward_sums:
                    stats.update_forward(j, h.detach()[tok], torch.ones(tok.shape[0], device=h.device), v,
                                         x=rows[j].detach()[tok])
                if self.gradients and h.requires_grad:
                    h.register_hook(lambda grad, j=j, v=v, tok=tok: stats.update_grad(j, grad.detach()[tok], v))
                outs.append(F.linear(h, roles["down"][j], roles["down_bias"][j] if "down_bias" in roles else None))
            return torch.cat(outs).to(routed_in.dtype)  # [E·T, H]

        return forward

    def _forward_for(self, block: nn.Module, experts: nn.Module, stats: NeuronLayerStats, routes: BlockRoutes):
        adapter, glu, E = self.adapter, self.adapter.expert_glu(experts), stats.num_experts

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            roles = adapter.expert_roles(block)  # fresh views each call: gate/up [E, I, H], down [E, H, I]
            shape = hidden_states.shape  # [T, H], or [B, S, H] (DBRX hands its experts unflattened states)
            hidden_states = hidden_states.reshape(-1, shape[-1])  # [T, H]
            out = torch.zeros_like(hidden_states)  # [T, H]
            T = hidden_states.shape[0]
            valid = (self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool)).to(
                stats.sums["count"].device, torch.float64)  # [T]
            # a zero-expert slot the block handles itself reaches here as a dummy expert at weight 0: read as its
            # class (`stats/block_routes.py`) and left to the block; one the experts hold (5.24) adds w·x here
            top_k_index, top_k_weights, held = routes.resolve(top_k_index, top_k_weights)
            if held is not None:
                top_k_index = torch.where(held, E + adapter.extra_classes, top_k_index)  # skipped below
            for j in top_k_index.unique().tolist():
                if E <= j < E + adapter.extra_classes:  # an identity zero expert (LongCat-Flash): out += w·x
                    tok, slot = torch.where(top_k_index == j)
                    w = top_k_weights[tok, slot]  # [n]
                    out.index_add_(0, tok, (hidden_states[tok] * w[:, None].to(hidden_states.dtype)).to(out.dtype))
                    continue
                if j >= E:  # a masked slot
                    continue
                tok, slot = torch.where(top_k_index == j)  # routed tokens of j and their top-k position
                n = tok.shape[0]
                x = hidden_states[tok]  # [n, H]
                xp = pad_rows(x)  # [n', H]: n rounded up on the CPU in bf16 (`io/kernel_cache.pad_rows`)
                g = (F.linear(xp, roles["gate"][j], roles["gate_bias"][j] if "gate_bias" in roles else None)
                     if "gate" in roles else None)  # [n', I]; None for up-only experts
                u = F.linear(xp, roles["up"][j], roles["up_bias"][j] if "up_bias" in roles else None)
                hp = glu(g, u)  # [n', I]
                h = hp[:n]  # [n, I]
                w = top_k_weights[tok, slot]  # [n]
                v = valid[tok.to(valid.device)]  # [n]
                if self.forward_sums:
                    stats.update_forward(j, h.detach(), w.detach(), v, x=x.detach())
                if self.gradients and hp.requires_grad:
                    hp.register_hook(lambda grad, j=j, v=v, n=n: stats.update_grad(j, grad[:n].detach(), v))
                y = F.linear(hp, roles["down"][j], roles["down_bias"][j] if "down_bias" in roles else None)[:n]
                out.index_add_(0, tok, (y * w[:, None].to(y.dtype)).to(out.dtype))
            return out.view(shape)

        return forward


@contextmanager
def _embeddings_require_grad(model: nn.Module) -> Iterator[None]:
    """Make the graph start at the input embeddings, so activations get gradients while no parameter does."""
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        hook.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def summed_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Σ over counted positions (t and t+1 both real) of −log p(x_{t+1} | x_{≤t}); logits [B, S, V]."""
    keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()  # [B, S-1]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, S-1]
    return nll[keep].sum()


def windows(sets: list[CalibSet], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids [B, S], attention_mask [B, S]) of `batch_size` windows at a time, set after set."""
    return [(s.input_ids[i:i + batch_size], s.attention_mask[i:i + batch_size])
            for s in sets for i in range(0, s.input_ids.shape[0], batch_size)]


def collect_neuron_stats(model: nn.Module, adapter: MoEAdapter, sets: list[CalibSet], *, gradients: bool,
                         batch_size: int = 8, inputs: bool = True) -> dict[int, NeuronLayerStats]:
    """One pass over every set's windows (forward, plus backward of the summed NLL when `gradients`).

    Returns {MoE layer: NeuronLayerStats} summed over all sets (in_sq only with `inputs`). The model is left
    unchanged (no parameter ever receives a gradient)."""
    device = next(model.parameters()).device
    batches = windows(sets, batch_size)
    was_training = model.training
    model.eval()
    grad_ctx = _embeddings_require_grad(model) if gradients else nullcontext()
    try:
        with eager_experts(model), grad_ctx, NeuronCollector(model, adapter, gradients, inputs=inputs) as col:
            for ids, mask in tqdm(batches, desc="neuron statistics" + (" (+gradients)" if gradients else ""),
                                  unit="batch"):
                ids, mask = ids.to(device), mask.to(device)
                col.valid = mask.reshape(-1).bool()
                if gradients:
                    with torch.enable_grad():
                        inputs = {"input_ids": ids, "attention_mask": mask}
                        h = last_hidden(model, adapter, inputs)  # [B, S, H], with its graph through the layers
                        h.backward(nll_gradient(model, adapter, inputs, h))
                else:
                    with torch.no_grad():
                        model(input_ids=ids, attention_mask=mask)
            return {layer: s.to("cpu") for layer, s in col.stats.items()}
    finally:
        model.train(was_training)

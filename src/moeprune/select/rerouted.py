"""err(D) on the tokens a dropped set D re-routes: the block runs only where masking D changes the routing.

    err(D) = Σ_t ‖Z_t − MoE_{E∖D}(X_t)‖²  =  Σ_{t ∈ C(D)} ‖Z_t − MoE_{E∖D}(X_t)‖²
    C(D)   = {t : the routing block_{E∖D} hands its experts on x_t ≠ the routing without the mask}

X, Z: a MoE block's cached input and output rows [n, H]; MoE_{E∖D} is the model's own block with D masked inside its
own router (`models.masking.masked_experts`). The block is per token and its output is R(x_t) + experts(x_t, S, w),
where only the routing (S, w) — the indices and weights the block passes its experts module — depends on D. So a
token whose routing under D equals its routing without the mask (the same index tensor row, and weights within
`ULPS` float32 units in the last place: routers compute their weights in float32, and renormalising over a changed
softmax denominator rounds differently there; bf16 weights then differ by a whole bf16 ulp or not at all) has the
same output and adds nothing to err(D) but the block's own rounding, which the reference
(`reconstruction.block_evaluator`, every token through the block) counts and this does not.

The routing is read, not assumed: a block forward with the experts silenced (`models.silenced`) records what the
block would hand its experts under the mask. Softmax-then-top-k routers that renormalise change only the tokens with
a dropped expert in their top-k; routers that do not renormalise (the weights are a softmax over every expert)
also change every token whose weights move by more than rounding, and group-limited routers can re-route tokens
whose groups' scores change; all of them run in full. Cost per set:
the block without its routed experts on all n tokens (router, shared experts) plus the whole block on |C(D)|
tokens, against the whole block on n for the reference. Blocks whose experts take pre-scaled inputs (Llama 4,
`stats/prescaled.py`) or record no routing run every token, as the reference does.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_experts
from moeprune.models.silenced import experts_silenced
from moeprune.stats.prescaled import is_prescaled

ULPS = 4  # weights within this many float32 units in the last place count as unchanged (module docstring)
TOL = ULPS * torch.finfo(torch.float32).eps


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # some blocks also return router logits / scores


class ReroutedEvaluator:
    """err(D) (module docstring) of one layer's block on rows x, z [n, H]; `tokens_run` / `tokens_seen` count the
    rows the block ran on and the rows scored, over every call."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, layer: int, x: torch.Tensor, z: torch.Tensor):
        self.model, self.adapter, self.layer = model, adapter, layer
        self.block = adapter.block(model, layer)
        self.experts = adapter.experts(self.block)
        device = next(self.block.parameters()).device
        self.x, self.z = x.to(device), z.to(device)  # [n, H] each
        self.tokens_run = self.tokens_seen = 0
        self.base = None if is_prescaled(self.experts) else self._routing()  # unmasked routing, or None: run all
        if self.base is None:
            logger.debug("layer %d: no routing to compare, the probe runs every token", layer)

    def _routing(self) -> list[torch.Tensor] | None:
        """The tensors the block hands its experts after the hidden states, each [n, ...] (None: not readable)."""
        calls: list[tuple] = []
        with torch.no_grad(), experts_silenced(self.experts, calls):
            self.block(self.x[None])  # [1, n, H]
        n = self.x.shape[0]
        tensors = [a for a in calls[0] if isinstance(a, torch.Tensor)] if len(calls) == 1 else []
        if not tensors or any(a.dim() == 0 or a.shape[0] != n for a in tensors):
            return None  # not one call with per-token routing: compare nothing, run every token
        return [a.reshape(n, -1) for a in tensors]

    def changed(self, now: list[torch.Tensor]) -> torch.Tensor:
        """[n] bool: rows whose routing differs from the unmasked one (indices exactly, weights beyond TOL·|w|)."""
        out = torch.zeros(self.x.shape[0], dtype=torch.bool, device=self.x.device)
        if now is None or len(now) != len(self.base):
            return torch.ones_like(out)
        for a, b in zip(now, self.base, strict=True):
            if a.shape != b.shape or a.dtype != b.dtype:
                return torch.ones_like(out)
            if a.is_floating_point():
                out |= ((a.float() - b.float()).abs() > TOL * b.float().abs()).any(dim=-1)
            else:
                out |= (a != b).any(dim=-1)
        return out

    def _rows(self) -> torch.Tensor:
        """[m] rows whose routing differs under the mask now active (every row without a readable routing)."""
        if self.base is None:
            return torch.arange(self.x.shape[0], device=self.x.device)
        return self.changed(self._routing()).nonzero().view(-1)

    @torch.no_grad()
    def rerouted(self, dropped: tuple[int, ...]) -> torch.Tensor:
        """[m] indices of the rows whose routing masking `dropped` changes (every row without a readable routing)."""
        with masked_experts(self.model, self.adapter, {self.layer: list(dropped)}):
            return self._rows()

    @torch.no_grad()
    def __call__(self, dropped: tuple[int, ...]) -> float:
        with masked_experts(self.model, self.adapter, {self.layer: list(dropped)}):
            rows = self._rows()  # [m]
            self.tokens_seen += self.x.shape[0]
            self.tokens_run += rows.numel()
            if rows.numel() == 0:
                return 0.0
            out = _output(self.block(self.x.index_select(0, rows)[None])).reshape(rows.numel(), -1)  # [m, H]
        z = self.z.index_select(0, rows)  # [m, H]
        return float((z.double() - out.double()).square().sum())

"""MoE blocks that call their experts on *pre-scaled* inputs (llama4), seen by the collectors as routed calls.

Most blocks call `experts(x [T, H], top_k_index [T, k], top_k_weights [T, k])` and the experts apply the weights to
their outputs. Llama4TextMoe instead scales the *input*: with dense scores s [T, E] (0 for unselected experts),

    routed_in = [s[:, 0]·x; s[:, 1]·x; ...; s[:, E-1]·x]   [E·T, H],   out = Σ_e experts(routed_in).view(E, T, H)[e]

so expert e's contribution to token t is o_e(t) = f_e(s_e(t)·x_t), not s_e(t)·f_e(x_t). `is_prescaled` tells the
two apart by the experts' forward signature (one tensor argument). The collectors keep the model's own call and
read the routing off it: `BlockInput` records x (a forward pre-hook on the block) and `dense_scores` recovers
s[t, e] = ⟨routed_in[e, t], x_t⟩ / ⟨x_t, x_t⟩ (float64; exact up to the rounding of s·x). The routed statistics then
use top_k_index / top_k_weights = the k largest scores and f_e(t) = o_e(t) / s_e(t), so that the gate-weighted
quantities (Σ g·f, g·‖f‖, EASY-EP's r) are the block's real contributions.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def is_prescaled(experts: nn.Module) -> bool:
    """True when the experts' forward takes the hidden states only (the block pre-scales them, see above)."""
    if isinstance(experts, nn.ModuleList):
        return False
    params = [p for p in inspect.signature(type(experts).forward).parameters.values()
              if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) == 1


class BlockInput:
    """Context manager: `x` is the last input of `block`, flattened to [T, H] (a forward pre-hook)."""

    def __init__(self, block: nn.Module):
        self.block, self.x, self._hook = block, None, None

    def _keep(self, module, args, kwargs) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        self.x = h.detach().reshape(-1, h.shape[-1])  # [T, H]

    def __enter__(self) -> BlockInput:
        self._hook = self.block.register_forward_pre_hook(self._keep, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self.x = None


def dense_scores(routed_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """routed_in [E·T, H] = per expert e the rows s[:, e]·x; x [T, H] -> s [T, E] (float64; see module docstring)."""
    T, H = x.shape
    xd = x.double()  # [T, H]
    scaled = routed_in.detach().double().view(-1, T, H)  # [E, T, H]
    return ((scaled * xd).sum(-1) / (xd * xd).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)).T  # [T, E]

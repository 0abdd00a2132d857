"""The routes a block chose, where the block hides some of them from its experts module.

Z weightless extra router classes (LongCat-Flash's identity "zero experts", classes E..E+Z-1) reach the experts
module in one of two ways, depending on the transformers release:
- held by the experts module (transformers 5.24): the experts see indices ≥ E and add w·x for them;
- held by the block (5.25: `LongcatFlashMoE.forward` adds w·x itself) — the experts see such a slot as a dummy
  routed index < E at weight 0, so a reader of the experts call alone would count a routing that did not happen.

`BlockRoutes` keeps the router's own top-k of its last call (a forward hook on the router: its output tuple holds
one integer [T, k] tensor, the indices, and one floating [T, k] tensor, the weights) and `resolve` returns, for an
experts call, the routes the block really chose: where the router picked an extra class (index ≥ E) and the
experts were handed another index at weight 0, the router's (index, weight); every other slot as the experts got
it. `hidden` [T, k] bool marks the slots the block handles itself (they add nothing to the experts' output).
Without extra classes, or with the 5.24 layout, resolve changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockRoutes:
    """Router top-k of the last call, for `resolve` (module docstring). Use as a context manager."""

    def __init__(self, router: nn.Module | None, num_experts: int, extra_classes: int):
        self.router, self.E, self.Z = router, num_experts, extra_classes
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hook = None

    def _keep(self, module, args, output) -> None:
        parts = output if isinstance(output, tuple) else (output,)
        ints = [t for t in parts if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point()]
        floats = [t for t in parts if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()
                  and ints and t.shape == ints[0].shape]
        self._last = (ints[0].detach(), floats[0].detach()) if len(ints) == 1 and len(floats) == 1 else None

    def __enter__(self) -> BlockRoutes:
        if self.Z and self.router is not None:
            self._hook = self.router.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def resolve(self, index: torch.Tensor, weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(indices [T, k], weights [T, k], hidden [T, k] bool or None) of the routes the block chose, for an
        experts call given `index` / `weights` [T, k]."""
        last, self._last = self._last, None
        if last is None or last[0].shape != index.shape:
            return index, weights, None
        r_index, r_weights = last[0].to(index.device), last[1].to(weights.device)
        hidden = (r_index >= self.E) & (index < self.E) & (weights == 0)  # [T, k]; no host sync
        return (torch.where(hidden, r_index.to(index.dtype), index),
                torch.where(hidden, r_weights.to(weights.dtype), weights), hidden)

"""Run a MoE block with its routed experts answering zeros, optionally recording the routing they were handed.

With the experts silenced the block's output is its expert-independent rest R (shared experts and their gates,
anything the block adds to the routed part; 0 for plain blocks), and its router, group limits, renormalisation
and scaling all run as the model's own code. So one silenced block forward both gives R (NAEE's fast evaluator,
`select/naee_outputs.py`) and reads the routing the block would apply (`select/rerouted.py`): the indices and
weights the block passes its experts module, for every family whose experts take them (blocks that pre-scale the
experts' input instead, `stats/prescaled.py`, pass none).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moeprune.models.forward_patch import forward_set


@contextmanager
def experts_silenced(experts: nn.Module, calls: list[tuple] | None = None) -> Iterator[None]:
    """While active the experts module returns zeros shaped like its hidden-states argument; with `calls`, every
    call appends the arguments after the hidden states (detached tensors: top-k indices and weights)."""

    def forward(hidden_states, *args, **kwargs):
        if calls is not None:
            calls.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        return torch.zeros_like(hidden_states)

    with forward_set(experts, forward):  # back to the forward it had on exit
        yield

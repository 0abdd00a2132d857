"""A module's forward replaced for the length of a `with` block, then restored as it was.

    with forward_replaced(module, lambda before: new_forward):   # new_forward may call `before`
        ...
    with forward_set(module, new_forward):                        # one that never calls it
        ...

`before` is the forward the module had (its class's, or an instance attribute someone set earlier); on exit an
earlier instance attribute is put back, otherwise the instance attribute is deleted so the class's forward shows
again. Every patch of a module's forward goes through it: prune-as-you-go's re-run (`calibration/expert_replay.py`,
`calibration/before_block.py`), the layer-by-layer engine's capture and head (`calibration/engine.capture`,
`layers_return`), the statistics collectors (`stats/routed.py`, `stats/neurons.py`), the router masks and shifts
(`models/masking.py`) and the silenced experts (`models/silenced.py`). A wrapper someone else set on the instance
(accelerate's hooks) thus survives them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from torch import nn


@contextmanager
def forward_replaced(module: nn.Module, make: Callable[[Callable], Callable]) -> Iterator[None]:
    own = module.__dict__.get("forward")  # an instance attribute set before this (None: the class's forward)
    module.forward = make(module.forward)
    try:
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            del module.forward


def forward_set(module: nn.Module, forward: Callable) -> AbstractContextManager[None]:
    """`forward_replaced` with a forward that does not call the one before it (it is still restored on exit)."""
    return forward_replaced(module, lambda _before: forward)

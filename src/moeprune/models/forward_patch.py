"""A module's forward replaced for the length of a `with` block, then restored as it was.

    with forward_replaced(module, lambda before: new_forward):   # new_forward may call `before`
        ...

`before` is the forward the module had (its class's, or an instance attribute someone set earlier); on exit an
earlier instance attribute is put back, otherwise the instance attribute is deleted so the class's forward shows
again. Used by prune-as-you-go's re-run (`calibration/expert_replay.py`, `calibration/before_block.py`) and by
the layer-by-layer engine's capture and head (`calibration/engine.capture`, `layers_return`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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

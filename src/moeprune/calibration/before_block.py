"""What a decoder layer computes before its MoE block, kept from the calibration pass for prune-as-you-go's re-run.

Prune-as-you-go (NAEE, `--as-you-go`) runs MoE layer i once with every expert, chooses the experts to drop, and
runs the layer again with them masked in its router (`calibration/session.py`), so that layer i+1 sees the pruned
layer's outputs. Masking changes only the MoE block. Everything the layer calls before the block (its input norm,
attention or linear attention, the norm in front of the block) gets the same inputs in the re-run and gives the
same outputs, so it is not computed again:

    pass:    layer(h_b) for each batch b; each child c of the layer (a direct child, or an item of a ModuleList
             child) called before the block: out_c,b kept
    re-run:  layer(h_b) with a child called before the block answering out_c,b (in call order, checked by name);
             the block and whatever follows it computed

The re-run's outputs are the full re-run's, bit for bit (tests/test_before_block.py, and the later layers'
statistics against a plain calibration of the masked model: tests/test_progressive.py). On the 24-layer benchmark
checkpoint (`benchmarks/big_model.py`, NAEE 25 %, one thread) the re-runs took 12.2 s, 5.2 s of it attention
(py-spy); alternated with the code before, NAEE took 106 / 115 s before and 95 / 102 s after (benchmarks/RESULTS.md).

Memory: the kept outputs of one layer, on the device that made them (there: tokens × H per child call, e.g. three
[B, S, H] per batch for a Qwen3-MoE layer). Beyond `max_bytes` the layer keeps nothing and its re-run computes
everything, as before."""

from __future__ import annotations

from collections import deque
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from moeprune.calibration.engine import map_tensors
from moeprune.log import logger
from moeprune.models.forward_patch import forward_replaced

MAX_BYTES = 1 << 30  # kept outputs per layer (tokens × H × children: 8 MB per child on the benchmark's 4 096 tokens)


class BeforeBlock:
    """One decoder layer's children called before its MoE block `block`: their outputs recorded in the pass
    (`record`), answered in the re-run (`replaying`)."""

    def __init__(self, layer: nn.Module, block: nn.Module, max_bytes: int = MAX_BYTES) -> None:
        self.layer, self.block, self.max_bytes = layer, block, max_bytes
        self.children = [(name, m) for name, m in _called_children(layer)  # not the block, nor what holds it
                         if not any(sub is block for sub in m.modules())]
        self.calls: deque[list[tuple[str, Any]]] = deque()  # per layer call: [(child, output)] before the block
        self.nbytes = 0
        self.complete = True  # False once over budget, or a call did not reach the block

    @contextmanager
    def record(self):
        """Keep what each layer call's children return before the block."""
        state = {"open": False}

        def layer_pre(module, args, kwargs) -> None:
            if state["open"]:  # the previous call never reached the block
                self.complete = False
            self.calls.append([])
            state["open"] = True

        def block_pre(module, args) -> None:
            state["open"] = False

        def child_post(name: str):
            def hook(module, args, output) -> None:
                if not state["open"] or not self.complete:
                    return
                kept, nbytes = _detached_copy(output)
                self.nbytes += nbytes
                if self.nbytes > self.max_bytes:
                    self._give_up(f"its outputs before the MoE block exceed {self.max_bytes / 2**20:.0f} MiB")
                    return
                self.calls[-1].append((name, kept))
            return hook

        handles = [self.layer.register_forward_pre_hook(layer_pre, with_kwargs=True),
                   self.block.register_forward_pre_hook(block_pre)]
        handles += [m.register_forward_hook(child_post(name)) for name, m in self.children]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            if state["open"]:
                self._give_up("a layer call never reached its MoE block")

    @contextmanager
    def replaying(self):
        """Each layer call's children, up to the block, answer what they returned in the pass (when every call was
        recorded; otherwise nothing changes)."""
        if not self.complete or not self.calls:
            yield self
            return
        current: deque[tuple[str, Any]] = deque()

        def layer_pre(module, args, kwargs) -> None:
            if current:
                raise RuntimeError(f"re-run: {current[0][0]} was not called again before the MoE block")
            current.extend(self.calls.popleft())

        def answering(name: str, forward):
            def forward_or_answer(*args, **kwargs):
                if not current:  # after the block: computed
                    return forward(*args, **kwargs)
                recorded, out = current.popleft()
                if recorded != name:
                    raise RuntimeError(f"re-run: {name} called where {recorded} was recorded before the MoE block")
                return out
            return forward_or_answer

        handle = self.layer.register_forward_pre_hook(layer_pre, with_kwargs=True)
        try:
            with ExitStack() as stack:
                for name, m in self.children:
                    stack.enter_context(forward_replaced(m, lambda before, name=name: answering(name, before)))
                yield self
        finally:
            handle.remove()
            self.calls.clear()

    def _give_up(self, why: str) -> None:
        logger.debug("the re-run computes the whole layer: %s", why)
        self.complete = False
        self.calls.clear()
        self.nbytes = 0


def _called_children(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layer's direct children, with a container's items in its place (LongCat-Flash holds its two attentions
    and norms in ModuleLists, which are never called themselves)."""
    out = []
    for name, m in layer.named_children():
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            out += [(f"{name}.{k}", sub) for k, sub in m.named_children()]
        else:
            out.append((name, m))
    return out


def _detached_copy(obj: Any) -> tuple[Any, int]:
    """(a module's output with every tensor detached and copied, their bytes); copied because the layer may change
    its own tensors in place."""
    nbytes = [0]

    def copy(t: torch.Tensor) -> torch.Tensor:
        nbytes[0] += t.numel() * t.element_size()
        return t.detach().clone()

    return map_tensors(obj, copy), nbytes[0]

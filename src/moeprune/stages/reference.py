"""The verification reference of a whole recipe: the ORIGINAL model, every expert slot and full width kept.

Each stage writes its change onto this one model in its own way, never through the surgery that made the export:

    slots[ℓ][i]       = the original slot of current expert i of layer ℓ (expert removal and merging shrink it)
    positions[ℓ][s]   = the original neuron positions that slot s's current neurons occupy (neuron removal)
    expert removal:   slots ← slots[kept]                                (the rest is masked at the end)
    neuron removal:   positions[s] ← positions[s][kept];  down[:, removed positions] = 0
    merging:          merged g = merge(current experts, read at their slots/positions);
                      written into the dominant's slot at its positions; `weighted` router rows
                      r[slot(d)] = Σ_i f_i r[slot(m_i)] / Σ_i f_i;  slots ← slots[dominants]
and finally every slot not in `slots` is masked out of the original's own router (`models/masking.py`).
The export, reloaded by stock `from_pretrained`, must compute the same function (`pipeline/verify.py`). New expert
values (merged, repaired, compressed) and new router rows are rounded to `storage`, the dtypes the export stores
its experts and its router in (bf16 for a bf16 checkpoint), before they are written in the compute dtype: the
export holds them rounded so.

`Reference.of_chain(model, adapter, chain, layers=...)` writes a whole recipe: `layers=None` changes every layer
(the whole-model verify); `layers=[i]` changes decoder layer i only and never touches another layer's tensors
(the layer-by-layer verify, where the other layers are on `meta`). The bookkeeping (`slots`, `positions`) always
covers every MoE layer; stages change tensors only in `scope(plan.layers)`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_experts

Expert = dict[str, torch.Tensor]  # canonical roles: gate/up [I, H], down [H, I], gate/up_bias [I], down_bias [H]


@dataclass(frozen=True)
class Storage:
    """The dtypes an export stores its routed experts' and its router's tensors in (None: write as computed)."""

    experts: torch.dtype | None = None
    router: torch.dtype | None = None


AS_COMPUTED = Storage()  # no rounding: values written as computed


def _stored(value: torch.Tensor, storage: torch.dtype | None, target: torch.Tensor) -> torch.Tensor:
    """`value` rounded to `storage` (when given), in `target`'s dtype, on its device (a plan's tensors are on the
    CPU; the reference model may be on a GPU)."""
    return (value if storage is None else value.to(storage)).to(device=target.device, dtype=target.dtype)


class Reference:
    def __init__(self, model: nn.Module, adapter: MoEAdapter, layers: Sequence[int] | None = None,
                 storage: Storage = AS_COMPUTED):
        self.model, self.adapter = model, adapter
        self.storage = storage  # the export's stored dtypes (module docstring)
        self.width = adapter.expert_width
        self.slots: dict[int, list[int]] = {layer: list(range(adapter.num_experts)) for layer in adapter.moe_layers()}
        self.positions: dict[int, dict[int, list[int]]] = {layer: {} for layer in adapter.moe_layers()}
        self.layers = None if layers is None else frozenset(layers)  # decoder layers whose tensors change

    @classmethod
    def of_chain(cls, model: nn.Module, adapter: MoEAdapter, chain: Sequence[tuple[Any, Any]],
                 layers: Sequence[int] | None = None, storage: Storage = AS_COMPUTED) -> Reference:
        """Every (stage, plan) of `chain` written in order onto `model` (only `layers`, when given)."""
        ref = cls(model, adapter, layers, storage)
        for stage, plan in chain:
            stage.reference(ref, plan)
            for layer, kept in (stage.survivors(plan) or {}).items():
                ref.keep_experts(layer, kept)
        return ref

    @contextmanager
    def routing(self) -> Iterator[dict]:
        """Inside: the masked slots (`masked`) of the layers in scope can never be routed to."""
        with masked_experts(self.model, self.adapter, self.masked()) as counters:
            yield counters

    # ------------------------------------------------------------------ bookkeeping
    def scope(self, layers: Sequence[int]) -> list[int]:
        """The MoE layers among `layers` whose tensors this reference changes."""
        return [layer for layer in layers if self.layers is None or layer in self.layers]

    def pos(self, layer: int, slot: int) -> list[int]:
        return self.positions[layer].get(slot, list(range(self.width)))

    def keep_experts(self, layer: int, kept: list[int]) -> None:
        """Current experts `kept` survive, renumbered 0..n-1 in that order."""
        self.slots[layer] = [self.slots[layer][i] for i in kept]

    def keep_neurons(self, layer: int, kept: dict[int, list[int]]) -> None:
        """Current expert i keeps its current neurons kept[i], renumbered in that order."""
        for i, neurons in kept.items():
            slot = self.slots[layer][i]
            p = self.pos(layer, slot)
            self.positions[layer][slot] = [p[k] for k in neurons]

    def masked(self) -> dict[int, list[int]]:
        """Slots no current expert occupies, per layer in scope: masked out of routing in the reference."""
        E = self.adapter.num_experts
        return {layer: [s for s in range(E) if s not in set(self.slots[layer])] for layer in self.scope(self.slots)}

    # ------------------------------------------------------------------ tensors
    @torch.no_grad()
    def zero_removed_neurons(self) -> None:
        """down[:, k] = 0 for every position k that no current neuron of its slot occupies, in the layers in scope
        (the zeros of `surgery.neurons.mask_neurons`); masked slots keep every neuron: they are never routed to."""
        for layer in self.scope(self.slots):
            for slot in self.slots[layer]:
                kept = set(self.pos(layer, slot))
                drop = [k for k in range(self.width) if k not in kept]
                if drop:
                    self._views(layer, slot)["down"][:, drop] = 0  # [H, I] columns

    def _block(self, layer: int) -> nn.Module:
        return self.adapter.block(self.model, layer)

    @torch.no_grad()
    def read_expert(self, layer: int, i: int) -> Expert:
        """Current expert i's tensors: its slot's rows/columns at its neuron positions (copies)."""
        slot = self.slots[layer][i]
        roles = self.adapter.expert_roles(self._block(layer))  # [E, ...] per role
        p = torch.tensor(self.pos(layer, slot), device=next(iter(roles.values())).device)
        out: Expert = {}
        for role, t in roles.items():
            x = t[slot]
            if role in ("gate", "up", "gate_bias", "up_bias"):
                x = x.index_select(0, p)  # [I', H] or [I']
            elif role == "down":
                x = x.index_select(1, p)  # [H, I']
            out[role] = x.detach().clone()
        return out

    @torch.no_grad()
    def write_expert(self, layer: int, i: int, expert: Expert) -> None:
        """Write `expert` (current width) into current expert i's slot at its neuron positions."""
        slot = self.slots[layer][i]
        views = self._views(layer, slot)
        p = torch.tensor(self.pos(layer, slot), device=next(iter(views.values())).device)
        for role, value in expert.items():
            target = views[role]
            value = _stored(value, self.storage.experts, target)
            if role in ("gate", "up", "gate_bias", "up_bias"):
                target[p] = value  # rows at the slot's positions
            elif role == "down":
                target[:, p] = value  # [H, I'] columns
            else:
                target.copy_(value)  # down bias [H]

    def _views(self, layer: int, slot: int) -> Expert:
        """Slot `slot`'s tensors by canonical role, as views that write through to the model."""
        return self.adapter.expert_views(self._block(layer), slot)

    @torch.no_grad()
    def weighted_router_rows(self, layer: int, groups: list[list[int]], weights: list[list[float]]) -> None:
        """Every expert-indexed router tensor t: t[slot(d)] = Σ_i f_i t[slot(m_i)] / Σ_i f_i (from the old rows)."""
        slots = self.slots[layer]
        for t in self.adapter.router_tensors(self._block(layer)).values():
            old = t.detach().clone().double()  # [E, ...]
            for group, w in zip(groups, weights, strict=True):
                f = torch.tensor(w, dtype=torch.float64, device=t.device)
                rows = old[[slots[m] for m in group]]  # [n, ...]
                mean = (f.view(-1, *[1] * (rows.dim() - 1)) * rows).sum(0) / f.sum()
                t.data[slots[group[0]]] = _stored(mean, self.storage.router, t)

    @torch.no_grad()
    def write_router_rows(self, layer: int, name: str, rows: torch.Tensor) -> None:
        """Router tensor `name`: row i of `rows` [E' (+ Z), ...] (current numbering) into row slot(i); rows past the
        current experts (weightless extra classes) go to the original's extra rows in order."""
        t = self.adapter.router_tensors(self._block(layer))[name]  # [E (+ Z), ...]
        slots = self.slots[layer]
        extra = list(range(self.adapter.num_experts, t.shape[0]))
        targets = slots + extra[: rows.shape[0] - len(slots)]
        t[torch.tensor(targets, device=t.device)] = _stored(rows, self.storage.router, t)

"""Per-expert weight summaries for data-free criteria, from a checkpoint on disk or a model in memory.

For expert j of a layer, over all of its parameters θ_j (gate, up, down and their biases, concatenated):
    abs_sum[j] = Σ|θ_j|,   sq_sum[j] = Σ θ_j²,   numel[j] = |θ_j|     (float64)
Reading from disk goes tensor by tensor, so memory stays at one tensor whatever the model size; quantized
checkpoints (FP8, MXFP4) are summarised on their dequantized weights (`io.quant.QuantFormat.read`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from moeprune.io.checkpoint import Checkpoint
from moeprune.io.safetensors_io import read_tensor
from moeprune.models.base import MoEAdapter
from moeprune.models.layouts import layout_of


@dataclass
class WeightSummary:
    abs_sum: torch.Tensor  # [E] float64
    sq_sum: torch.Tensor  # [E] float64
    numel: torch.Tensor  # [E] float64

    @classmethod
    def zeros(cls, num_experts: int) -> WeightSummary:
        z = torch.zeros(num_experts, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    def add(self, expert: int | slice, t: torch.Tensor) -> None:
        """Accumulate tensor `t` of one expert (int) or of all experts stacked on dim 0 (slice(None))."""
        t = t.double()
        if isinstance(expert, int):
            self.abs_sum[expert] += t.abs().sum()
            self.sq_sum[expert] += t.square().sum()
            self.numel[expert] += t.numel()
        else:
            flat = t.reshape(self.abs_sum.shape[0], -1)  # [E, n] (flat experts [E·I, H]: I rows each)
            self.abs_sum += flat.abs().sum(1)
            self.sq_sum += flat.square().sum(1)
            self.numel += flat.shape[1]


def summarize_checkpoint(ckpt: Checkpoint, adapter: MoEAdapter) -> dict[int, WeightSummary]:
    """Weight summaries of every MoE layer, read from the safetensors shards one tensor at a time."""
    out = {layer: WeightSummary.zeros(adapter.num_experts) for layer in adapter.moe_layers()}
    experts = [(e, adapter.classify_key(e.name)) for e in ckpt.entries]
    E = adapter.num_experts  # per-expert keys E.. and fused rows E..: unused weights of extra router classes
    experts = [(e, r) for e, r in experts if r.kind == "fused" or (r.kind == "expert" and r.expert < E)]
    quant, entries = ckpt.quantization, {e.name: e for e in ckpt.entries}
    for entry, role in tqdm(experts, desc="reading expert weights", unit="tensor", leave=False):
        # FP8 / MXFP4: the dequantized weight (its scale read with it, not summed on its own)
        t = read_tensor(entry) if quant is None else quant.read(entry, entries)
        if t is not None:
            if role.kind == "expert":
                out[role.layer].add(role.expert, t)
            else:
                out[role.layer].add(slice(None), t[:E])  # [E, ...] of E (+ Z) rows
    return out


@torch.no_grad()
def summarize_model(model: torch.nn.Module, adapter: MoEAdapter,
                    layers: list[int] | None = None) -> dict[int, WeightSummary]:
    """The same summaries from an in-memory model (of `layers` only, when given: e.g. one materialised layer)."""
    out = {}
    for layer in adapter.moe_layers() if layers is None else layers:
        experts = adapter.experts(adapter.block(model, layer))
        layout = layout_of(experts)
        summary = WeightSummary.zeros(layout.num_experts(experts))
        for j in range(layout.num_experts(experts)):
            for t in layout.expert_tensors(experts, j):
                summary.add(j, t)
        out[layer] = summary
    return out

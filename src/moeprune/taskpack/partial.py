"""Partial loading: the pruned model of a plan, built by reading only its kept experts' bytes from the shards.

The tensors are those the streaming export would write (`surgery.streaming.plan_tensors`: kept per-expert keys
renamed to 0..K−1, rows of fused tensors and routers, every other tensor whole), each as byte ranges of the
original shards, and the config is the one it would write (`set_config_dict_experts`). `io.lazy.load_lazy` builds
the stock model class from that config on `meta` and feeds it those tensors through transformers' own converters,
so the model equals `from_pretrained` of the exported folder bit for bit, while only

    bytes_read = Σ non-expert tensors + Σ_layers Σ_{j kept} (expert j's bytes)

are read (counted where they are read, `taskpack/counted.py`). Resident parameters = the same sum in the loaded
dtype.
"""

from __future__ import annotations

import json

from torch import nn

from moeprune.io.checkpoint import Checkpoint
from moeprune.io.lazy import load_lazy
from moeprune.models import get_adapter
from moeprune.select.plan import PrunePlan
from moeprune.surgery.streaming import plan_tensors
from moeprune.taskpack.counted import ByteCounter, counted_view


def pruned_config(ckpt: Checkpoint, kept_count: int):
    """The config object of the export: config.json with the routed-expert count set to `kept_count`."""
    raw = json.loads(json.dumps(ckpt.config_dict))
    get_adapter(ckpt.config, weight_keys=ckpt.names()).set_config_dict_experts(raw, kept_count)
    return type(ckpt.config).from_dict(raw)


def load_pruned(ckpt: Checkpoint, plan: PrunePlan, dtype: str = "auto") -> tuple[nn.Module, int]:
    """(the pruned model in eval mode, bytes read from the shards). A plan keeping every expert loads the original."""
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    plan.validate(adapter)
    counter = ByteCounter()
    view = counted_view(plan_tensors(ckpt, adapter, plan), counter)  # [what the export would write]
    lazy = load_lazy(ckpt.path, dtype, head=True, config=pruned_config(ckpt, plan.kept_count), tensors=view)
    return lazy.materialise(), counter.total


def full_plan(ckpt: Checkpoint) -> PrunePlan:
    """The plan that keeps every expert (the fallback of a retrieval below its margin)."""
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    E = adapter.num_experts
    return PrunePlan({layer: list(range(E)) for layer in adapter.moe_layers()}, E, method="full", ratio=0.0,
                     model_type=adapter.model_type)


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors once)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())

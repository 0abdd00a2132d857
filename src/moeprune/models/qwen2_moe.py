"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): like Qwen3-MoE plus one always-on shared expert scaled by
σ(shared_expert_gate(x)). The shared expert and its gate are never pruned."""

from moeprune.models.qwen3_moe import Qwen3MoeAdapter
from moeprune.models.registry import register_adapter


@register_adapter
class Qwen2MoeAdapter(Qwen3MoeAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    shared_names = ("shared_expert_gate", "shared_expert")

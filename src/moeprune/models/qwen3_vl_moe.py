"""Qwen3-VL-MoE: a vision-language model whose text decoder is Qwen3-MoE, nested under `text_config`
(decoder at `model.language_model.layers`, experts fused on disk as `experts.gate_up_proj`/`down_proj`).
Only the language model's routed experts are pruned; the vision tower is copied unchanged."""

from moeprune.models.qwen3_moe import Qwen3MoeAdapter
from moeprune.models.registry import register_adapter


@register_adapter
class Qwen3VLMoeAdapter(Qwen3MoeAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe", "qwen3_vl_moe_text")

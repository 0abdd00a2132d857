"""Qwen3-MoE: softmax top-k router (`mlp.gate`), fused experts, optional dense layers via
`mlp_only_layers` / `decoder_sparse_step`. Routing: p = softmax(ℓ), top-k, renormalised when `norm_topk_prob`."""

from moeprune.models.base import MoEAdapter
from moeprune.models.registry import register_adapter


def sparse_step_layers(config) -> list[int]:
    """MoE layers of the Qwen-MoE families: i ∉ mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return [i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0]


@register_adapter
class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    count_key = "num_experts"

    def moe_layers(self) -> list[int]:
        return sparse_step_layers(self.config)

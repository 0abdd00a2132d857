"""OLMoE: every layer MoE, softmax top-k router (renormalised only when `norm_topk_prob`), experts of width
`intermediate_size`."""

from moeprune.models.base import MoEAdapter
from moeprune.models.registry import register_adapter


@register_adapter
class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    count_key = "num_experts"
    intermediate_key = "intermediate_size"

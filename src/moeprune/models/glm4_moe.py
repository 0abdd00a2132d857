"""GLM-4.5 / 4.6 (`glm4_moe`): the DeepSeek-V3 routing (sigmoid, correction bias, groups, scaling) and shared
experts; the first `first_k_dense_replace` layers are dense."""

from moeprune.models.deepseek_v3 import DeepseekV3Adapter
from moeprune.models.registry import register_adapter


@register_adapter
class Glm4MoeAdapter(DeepseekV3Adapter):
    family = "glm4_moe"
    model_types = ("glm4_moe",)

"""DeepSeek-V3 / R1 (and Kimi-K2, which shares the config): sigmoid router with `e_score_correction_bias`,
group-limited selection (`n_group` groups, best `topk_group` kept), renormalisation and
`routed_scaling_factor`; shared experts; the first `first_k_dense_replace` layers are dense.

    s = σ(xWᵀ);  c = s + b;  group score = Σ top-2(c in group);  idx = topk(c in kept groups, k)
    w = s[idx] / Σ s[idx] (when norm_topk_prob) · routed_scaling_factor
"""

from moeprune.models.base import MoEAdapter
from moeprune.models.registry import register_adapter
from moeprune.models.routing import RoutingSpec


@register_adapter
class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    count_key = "n_routed_experts"
    shared_names = ("shared_experts",)

    def moe_layers(self) -> list[int]:
        first = int(getattr(self.config, "first_k_dense_replace", 0) or 0)
        return list(range(first, self.num_layers))

    def routing(self) -> RoutingSpec:
        c = self.config
        return RoutingSpec(
            kind="sigmoid_grouped",
            top_k=self.top_k,
            norm_topk_prob=bool(c.norm_topk_prob),
            n_group=int(c.n_group or 1),
            topk_group=int(c.topk_group or 1),
            routed_scaling_factor=float(c.routed_scaling_factor),
            correction_bias=True,
        )

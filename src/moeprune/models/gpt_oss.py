"""gpt-oss: router `mlp.router` with a bias; routing takes the top-k *logits* and softmaxes over them
(w = softmax(ℓ[topk(ℓ)])). Experts are fused on disk too and transposed with biases:
gate_up_proj [E, H, 2I] (gate = even columns, up = odd), gate_up_proj_bias [E, 2I],
down_proj [E, I, H], down_proj_bias [E, H]. The clamped GLU is the experts' own `_apply_gate`
(`MoEAdapter.expert_glu`)."""

from moeprune.models.base import MoEAdapter
from moeprune.models.registry import register_adapter
from moeprune.models.routing import RoutingSpec


@register_adapter
class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    count_key = "num_local_experts"
    intermediate_key = "intermediate_size"
    router_name = "router"
    fused_style = "interleaved_t"

    def routing(self) -> RoutingSpec:
        return RoutingSpec(kind="topk_softmax", top_k=self.top_k, router_bias=True)

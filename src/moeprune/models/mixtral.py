"""Mixtral: softmax top-k router, always renormalised. In memory the block is `mlp`; on disk (Hub layout) it is
`block_sparse_moe.experts.J.w1/w2/w3` and `block_sparse_moe.gate.weight`. Expert width is `intermediate_size`."""

from moeprune.models.base import MoEAdapter
from moeprune.models.registry import register_adapter
from moeprune.models.routing import RoutingSpec


@register_adapter
class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    count_key = "num_local_experts"
    intermediate_key = "intermediate_size"
    disk_block_names = ("block_sparse_moe", "mlp")

    def routing(self) -> RoutingSpec:
        return RoutingSpec(kind="softmax_topk", top_k=self.top_k, norm_topk_prob=True)

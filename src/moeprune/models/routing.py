"""How a family's router turns hidden states into (expert indices, gate weights), as data.

moeprune never re-implements a router to *compute* routing: statistics read the weights the model's own router
hands to its experts, and verification masks experts *inside* the model's own router code (see `masking.py`).
`RoutingSpec` describes the routing so that selection can check a plan is routable and reports can say what
the model does.

Kinds (T tokens, E experts, ℓ = router logits [T, E]):
- ``softmax_topk``  (Qwen2/3-MoE, Mixtral, OLMoE): p = softmax(ℓ); idx = topk(p, k); w = p[idx]
  (÷ Σ w when ``norm_topk_prob``).
- ``topk_softmax``  (gpt-oss): ℓ = xWᵀ + b; idx = topk(ℓ, k); w = softmax(ℓ[idx]).
- ``sigmoid_grouped`` (DeepSeek-V3, GLM-4.5): s = σ(ℓ); c = s + e_score_correction_bias; experts split into
  ``n_group`` contiguous groups, group score = sum of the top-2 c in the group; keep ``topk_group`` groups;
  idx = topk(c restricted to kept groups, k); w = s[idx] (÷ Σ w when ``norm_topk_prob``) × routed_scaling_factor.
- ``softmax_grouped`` (DeepSeek-V2 group-limited greedy): p = softmax(ℓ); group score = max p in the group; keep
  ``topk_group`` groups; idx = topk(p in kept groups, k).
- ``softmax_bias`` (ERNIE-4.5, LongCat): p = softmax(ℓ); idx = topk(p + correction bias, k); w = p[idx] (÷ Σ w).
  Masked twice: at the logits, so p is the softmax over the kept experts only (what the pruned router computes),
  and at the softmax output, so p = -inf for a removed expert (p = 0 alone could be lifted into the top-k by
  the bias).
- ``sigmoid_topk`` (Llama-4, Flint, Kolibri-1, Cohere2-MoE with sigmoid): sigmoid of the logits, after top-k, or
  before it without a selection bias; a selection bias, if any, is added to the logits (Kolibri-1:
  idx = topk(ℓ + b, k); w = σ(ℓ[idx])). Masked at the logits (σ(-inf) = 0 is never above a kept expert's score,
  and a top-k over logits, biased or not, never picks -inf).
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTING_KINDS = ("softmax_topk", "topk_softmax", "sigmoid_grouped", "softmax_grouped", "softmax_bias", "sigmoid_topk")
# kind -> the router ops whose outputs (last dim E) the masked reference adds -inf to, in call order
MASKED_OPS: dict[str, tuple[str, ...]] = {
    "softmax_topk": ("linear",), "topk_softmax": ("linear",), "softmax_grouped": ("linear",),
    "sigmoid_topk": ("linear",), "sigmoid_grouped": ("sigmoid",), "softmax_bias": ("linear", "softmax"),
}


@dataclass(frozen=True)
class RoutingSpec:
    kind: str
    top_k: int
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    correction_bias: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ROUTING_KINDS:
            raise ValueError(f"routing kind {self.kind!r} is not one of {ROUTING_KINDS}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    @property
    def masked_ops(self) -> tuple[str, ...]:
        """The tensors inside the router that get -inf for removed experts (every one is masked on every call):
        the logits (``linear``), the sigmoid scores, the softmax probabilities (see the module docstring)."""
        return MASKED_OPS[self.kind]

    @property
    def group_limited(self) -> bool:
        return self.kind in ("sigmoid_grouped", "softmax_grouped") and self.n_group > 1

    @property
    def local_masking(self) -> bool:
        """True when masking an expert that a token does not select leaves that token's route (selected experts and
        gate weights) as it is, so a dropped set's error differs from its parent's only on the tokens that selected
        the newly dropped expert (NAEE's incremental scoring, `select/naee_incremental.py`):
        - topk_softmax, sigmoid_topk, and sigmoid_grouped without a group limit: each kept expert's score and the
          selection depend on its own logit (and bias) only; the weights on the selected ones only;
        - softmax_topk / softmax_grouped (no group limit) with ``norm_topk_prob``: p_i / Σ_{selected} p = e^{ℓ_i} /
          Σ_{selected} e^{ℓ}, whatever the other logits (equal in exact arithmetic; float rounding differs);
        not local: without renormalisation every weight is divided by a sum over all kept experts; softmax_bias's
        selection compares that softmax with a bias; a group limit (topk_group < n_group) scores groups by their
        top experts (top-2 sum for sigmoid_grouped, the max for softmax_grouped), which a masked unselected expert
        can be one of — except with one kept group and top_k ≥ the experts a group score counts: the kept group's
        scoring experts are then all selected, and masking another group's expert only lowers a group not kept."""
        if self.group_limited and self.topk_group < self.n_group:
            scoring = 2 if self.kind == "sigmoid_grouped" else 1
            if self.topk_group != 1 or self.top_k < scoring:
                return False
        if self.kind in ("topk_softmax", "sigmoid_topk", "sigmoid_grouped"):
            return True
        return self.kind in ("softmax_topk", "softmax_grouped") and self.norm_topk_prob

    @property
    def group_reach(self) -> bool:
        """True for a group limit scored by top-2 sums (sigmoid_grouped, topk_group < n_group: DeepSeek-V3/R1,
        GLM-4.5 with several groups): masking an expert j that token t does not select changes t's route only when
        j's group is among t's kept groups and j is one of that group's top-2 (only then does a kept group's score
        fall, so the kept groups can change); otherwise every kept group's score, the kept groups, the selection
        among them and the gate weights (each selected expert's own score) stay. NAEE's incremental scoring then
        reroutes those tokens too (`select/naee_incremental.py`), read from the router's own group choices."""
        return self.kind == "sigmoid_grouped" and self.group_limited and self.topk_group < self.n_group

    @property
    def local_selection(self) -> bool:
        """True when masking experts never changes the order in which the router selects the others: a top-k over
        per-expert scores that a mask does not reorder (softmax_topk with or without renormalisation — the softmax
        over fewer experts scales every probability alike —, topk_softmax, sigmoid_topk, and the grouped kinds
        without a group limit). Not softmax_bias (p·c + bias can reorder when the softmax's scale c changes), nor a
        group limit (masking a group's top experts can hand the selection to another group). NAEE's precompute then
        needs each token's first k + |D| choices only (`select/naee_candidates.py`)."""
        if self.group_limited and self.topk_group < self.n_group:
            return False
        return self.kind != "softmax_bias"

    def min_experts_per_group(self) -> int:
        """Smallest number of experts each group must keep for the stock router to still run and reach top_k.

        The group score takes the top-2 inside each group, so every group needs >= 2 experts; the kept groups
        (``topk_group`` of them) must together hold at least ``top_k`` experts.
        """
        need_for_topk = -(-self.top_k // max(self.topk_group, 1))  # ceil
        return max(2 if self.kind == "sigmoid_grouped" else 1, need_for_topk)

    def describe(self) -> str:
        parts = [self.kind, f"top-{self.top_k}"]
        if self.norm_topk_prob:
            parts.append("renormalised")
        if self.group_limited:
            parts.append(f"groups {self.topk_group}/{self.n_group}")
            if self.routed_scaling_factor != 1.0:
                parts.append(f"scale {self.routed_scaling_factor:g}")
        if self.router_bias:
            parts.append("router bias")
        if self.correction_bias:
            parts.append("correction bias")
        return ", ".join(parts)

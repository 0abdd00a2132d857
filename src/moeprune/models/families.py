"""The MoE families moeprune supports through `StructuralAdapter`, as data: one `FamilySpec` row each.

A row says only what the structure cannot: the routing kind when reading it off the router's source is ambiguous,
extra config keys, or why the family is refused. Everything else (MoE layers, names, counts, layouts) is found on
the stock model (`models/structure.py`). The eight families with hand-written adapters (`models/<family>.py`) are
not listed here. Each row is verified by `tests/test_family_matrix.py` / `benchmarks/families.py`; a family of a
newer transformers that is not listed is reported there as unsupported until a row is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.models.registry import ADAPTERS
from moeprune.models.registry import REFUSED as REFUSALS
from moeprune.models.structural import StructuralAdapter


@dataclass(frozen=True)
class FamilySpec:
    family: str
    model_types: tuple[str, ...]
    routing: str | None = None  # a RoutingSpec kind; None: inferred (models/structural.py)
    count_keys: tuple[str, ...] = ()
    top_k_keys: tuple[str, ...] = ()
    width_keys: tuple[str, ...] = ()
    # fused experts without transformers' layout flags (`is_transposed`, ...): their style (models/fused_styles.py)
    fused_style: str | None = None
    router_logits_at: int = 0  # the element of the router's output tuple holding the logits
    note: str = ""  # what the router does, in one line
    # routing chosen by a config value: the (text) config attribute and (value, kind) pairs; overrides `routing`
    routing_key: str = ""
    routing_by: tuple[tuple[Any, str], ...] = ()
    # config key holding Z, the router classes after the E experts that have no expert weights (identity "zero
    # experts"): kept, never counted as experts (`MoEAdapter.extra_classes`)
    extra_classes_key: str = ""

    def routing_kind(self, config: Any) -> str | None:
        """The routing kind for this (text) config: picked by `routing_key` when set, else `routing`."""
        if not self.routing_key:
            return self.routing
        value = getattr(config, self.routing_key, None)
        kinds = dict(self.routing_by)
        if value not in kinds:
            raise MoePruneError(f"{self.family}: config {self.routing_key}={value!r} selects a routing moeprune does "
                                f"not know; known values: {', '.join(repr(v) for v in kinds)} "
                                "(models/families.py).")
        return kinds[value]


# families that cannot be pruned correctly, with the reason (checked before any work)
REFUSED: dict[str, str] = {
    "deepseek_v4": "its first layers route by a hash of the token id (DeepseekV4HashRouter), not by router scores: "
                   "removing an expert would re-hash tokens, which no router mask can express.",
    "jetmoe": "one config key (num_local_experts) sizes two different expert sets per layer: the mixture-of-attention "
              "experts (self_attention.experts, JetMoeMoA) and the MLP experts (mlp.input_linear/output_linear, "
              "JetMoeParallelExperts, routed by mlp.router without an 'experts' container); removing experts from "
              "one set cannot be written into a stock config, and neither set has a supported experts layout.",
    "diffusion_gemma": "a block-diffusion model with two MoE decoder stacks (encoder and decoder) sized by one text "
                       "config; moeprune prunes one stack of decoder layers, so the export's other stack would no "
                       "longer match its config.",
    "ergo": "each routed expert ends in its own RMSNorm (ErgoExperts.post_expert_norm, [E, H]) applied before the "
            "gate weight, and the router's weight sits one module deeper (gate.linear); moeprune models an expert as "
            "its MLP alone, so its expert outputs, merges and neuron plans would leave the norm out. A family spec "
            "with the post-expert norm in the expert function is needed.",
    "ernie4_5_vl_moe": "each MoE layer holds a text and a vision expert set with list-valued counts "
                       "(moe_num_experts [text, vision]); moeprune handles one routed expert set per layer.",
    "inkling_text": "its router weight has E + S rows (the last S score the shared experts, and all E + S sigmoid "
                    "scores are normalised together); removing experts needs masking and slicing of the first E "
                    "rows only, which is not implemented.",
    "inkling_mm_model": "its text model is inkling_text (see there).",
    "zaya": "its router scores E + 1 classes (a 'skip' class without weights) and passes router states from layer "
            "to layer; neither is supported.",
}

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("afmoe", ("afmoe",)),
    FamilySpec("aria", ("aria", "aria_text")),
    FamilySpec("cohere2_moe", ("cohere2_moe",), routing_key="expert_selection_fn",
               routing_by=(("softmax", "topk_softmax"), ("sigmoid", "sigmoid_topk")),
               note="top-k of the logits, then softmax or sigmoid (config expert_selection_fn) over the k selected"),
    FamilySpec("ernie4_5_moe", ("ernie4_5_moe",),
               note="softmax over all experts, top-k of softmax + [1, E] correction bias (moe_statics), gather the "
                    "softmax, renormalise"),
    FamilySpec("exaone_moe", ("exaone_moe",)),
    FamilySpec("flint", ("flint",)),
    FamilySpec("granitemoe", ("granitemoe",)),
    FamilySpec("granitemoe_swa", ("granitemoe_swa",)),
    FamilySpec("granitemoeshared", ("granitemoeshared",)),
    FamilySpec("hy_v3", ("hy_v3",)),
    FamilySpec("inkling2", ("inkling2_text", "inkling2_loop_text"), routing_key="scoring_func",
               routing_by=(("sigmoid", "sigmoid_grouped"),),
               note="score_fn (config scoring_func) of the logits, top-k of score + correction bias, gather the "
                    "scores, renormalise, scale"),
    FamilySpec("kolibri1", ("kolibri1",),
               note="top-k of logits + correction bias, sigmoid of the selected logits only, optional renormalise"),
    FamilySpec("laguna", ("laguna",),
               note="optional tanh softcap of the logits, sigmoid, top-k of sigmoid + correction bias, gather the "
                    "sigmoid, renormalise"),
    FamilySpec("lara_mini", ("lara_mini",)),
    FamilySpec("llama4", ("llama4_text",), width_keys=("intermediate_size",), fused_style="concat_t",
               router_logits_at=1, note="Llama4TextExperts: gate_up [E, H, 2I], down [E, I, H], no layout flags; the "
               "block pre-scales the experts' input by sigmoid(top-k logits); the router returns (scores, logits)"),
    FamilySpec("mellum", ("mellum",)),
    FamilySpec("mimo_v2_flash", ("mimo_v2_flash",)),
    FamilySpec("minimax", ("minimax",)),
    FamilySpec("minimax_m2", ("minimax_m2",)),
    FamilySpec("minimax_m3_vl", ("minimax_m3_vl_text",),
               note="sigmoid of the logits, top-k of sigmoid + correction bias, gather the sigmoid, renormalise; "
                    "the block scales by routed_scaling_factor"),
    FamilySpec("nemotron_h", ("nemotron_h",)),
    FamilySpec("phimoe", ("phimoe",)),
    FamilySpec("qwen3_5_moe", ("qwen3_5_moe_text",)),
    FamilySpec("qwen3_next", ("qwen3_next",)),
    FamilySpec("qwen3_omni_moe", ("qwen3_omni_moe_thinker", "qwen3_omni_moe"),
               note="softmax, top-k, renormalised (Qwen3-MoE); the thinker config must carry vision_start_token_id "
                    "as real checkpoints do (its class lacks the field its model reads)"),
    FamilySpec("solar_open", ("solar_open",)),
    FamilySpec("axk1", ("axk1",)),
    FamilySpec("axk2", ("axk2",)),
    FamilySpec("bailing_hybrid", ("bailing_hybrid",)),
    FamilySpec("beam", ("beam",)),
    FamilySpec("deepseek_ocr2", ("deepseek_ocr2", "deepseek_ocr2_text")),
    FamilySpec("deepseek_v2", ("deepseek_v2",)),
    FamilySpec("deepseek_v32", ("deepseek_v32",)),
    FamilySpec("dots1", ("dots1",)),
    FamilySpec("dots3_note", ("dots3_note", "dots3_note_text")),
    FamilySpec("flex_olmo", ("flex_olmo",)),
    FamilySpec("gemma4", ("gemma4", "gemma4_text")),
    FamilySpec("glm4_moe_lite", ("glm4_moe_lite",)),
    FamilySpec("glm4v_moe", ("glm4v_moe", "glm4v_moe_text")),
    FamilySpec("glm5_next", ("glm5_next", "glm5_next_text")),
    FamilySpec("glm_moe_dsa", ("glm_moe_dsa",)),
    FamilySpec("granitemoehybrid", ("granitemoehybrid",)),
    FamilySpec("hunyuan_v1_moe", ("hunyuan_v1_moe",)),
    FamilySpec("hy_v4", ("hy_v4",)),
    FamilySpec("hy_v4_vl", ("hy_v4_vl", "hy_v4_vl_text")),
    FamilySpec("jamba", ("jamba",)),
    FamilySpec("kimi_linear", ("kimi_linear",)),
    FamilySpec("lfm2_moe", ("lfm2_moe",)),
    FamilySpec("longcat_flash", ("longcat_flash",), routing="softmax_bias", extra_classes_key="zero_expert_num",
               note="softmax over E experts + Z identity zero experts, top-k of softmax + correction bias, gather, "
                    "scale; two attention sublayers per decoder layer (num_hidden_layers = 2 × num_layers)"),
    FamilySpec("minicpm5_moe", ("minicpm5_moe",),
               note="DeepSeek-V3's group-limited routing (sigmoid + correction bias, top-2 sum per group), the "
                    "router's logits always in float32"),
    FamilySpec("mistral4", ("mistral4",)),
    FamilySpec("mistral_large4", ("mistral_large4", "mistral_large4_text")),
    FamilySpec("muse_spark", ("muse_spark", "muse_spark_text")),
    FamilySpec("qwen4_exp", ("qwen4_exp", "qwen4_exp_text")),
    FamilySpec("step3p7", ("step3p7", "step3p5")),
    FamilySpec("unlimited_ocr", ("unlimited_ocr", "unlimited_ocr_text")),
    FamilySpec("zaya", ("zaya",)),
    FamilySpec("dbrx", ("dbrx",), count_keys=("ffn_config.moe_num_experts",), top_k_keys=("ffn_config.moe_top_k",),
               width_keys=("ffn_config.ffn_hidden_size",),
               note="flat experts experts.mlp.w1/v1/w2 [E·I, H] (models/layouts.FlatLayout); counts in ffn_config; "
                    "softmax, top-k, divided by the p-norm of the top-k (moe_normalize_expert_weights)"),
)


def _register(spec: FamilySpec) -> None:
    cls = type(f"{spec.family.title().replace('_', '')}Adapter", (StructuralAdapter,),
               {"family": spec.family, "model_types": spec.model_types, "spec": spec,
                "__doc__": f"{spec.family}: found by structure ({spec.note or 'see models/families.py'})."})
    for model_type in spec.model_types:
        ADAPTERS.register(model_type, cls)


for _spec in FAMILIES:
    _register(_spec)
REFUSALS.update(REFUSED)

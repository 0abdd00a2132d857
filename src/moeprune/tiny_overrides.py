"""Per-family corrections to the generic tiny shrink of `moeprune.tiny_families` (what a generic rule cannot
know), and the families that cannot be built tiny here, with the reason.

An entry holds config kwargs; a nested dict (`text_config`, `vision_config`, ...) updates that sub-config.
"""

from __future__ import annotations

# mamba2 mixer: heads x head dim must equal expand x hidden (2 x 32)
_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16)
# indexed (DSA-style) sparse attention: a tiny indexer
_INDEXER = dict(index_head_dim=8, index_n_heads=2, index_topk=16)

TINY_OVERRIDES: dict[str, dict] = {
    # one attention layer among the mamba ones (the cache needs one; the defaults are all-mamba)
    "bamba": _MAMBA2 | dict(attn_layer_indices=[1]),
    "granitemoehybrid": _MAMBA2 | dict(shared_intermediate_size=24, layer_types=[
        "linear_attention", "full_attention", "linear_attention", "linear_attention"]),
    # dbrx names its sizes d_model / n_heads / n_layers and keeps attention and experts in sub-configs; its
    # attention still reads attn_config.rope_theta, a field the config class no longer defines, and clamps with
    # clip_qkv, which must not be None (DBRX checkpoints use 8)
    "dbrx": dict(d_model=32, n_heads=4, n_layers=4, max_seq_len=128,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2)),
    # num_hidden_layers is a property (2 x num_layers: each layer holds two attention + dense sublayers and one MoE);
    # zero experts (identity outputs the router may pick) are kept, but few
    "longcat_flash": dict(num_layers=2, zero_expert_num=2),
    # mamba2 heads x head dim = 2 x hidden; the block pattern keeps mamba, attention and two MoE layers
    "nemotron_h": dict(mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16, chunk_size=16,
                       layers_block_type=["linear_attention", "moe", "full_attention", "moe"]),
    "dots1": dict(n_shared_experts=1),  # defaults to None, which the shared-expert width multiplies
    "hunyuan_v1_moe": dict(head_dim=8),  # the field defaults to None, which the attention reads as-is
    # mamba / attention and dense / MoE layers interleave by period: 0 mamba+dense, 1 mamba+MoE, 2 attention+dense,
    # 3 mamba+MoE
    "jamba": dict(attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
                  mamba_dt_rank=8),
    # layer_types defaults to None (the modeling indexes it): conv and attention layers, the first one dense
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "mistral4": dict(head_dim=16, qk_head_dim=16),  # head_dim = nope + rope dims (rope covers half of it)
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=16),  # ZAYA validates top-1 routing only
    "glm4v_moe": dict(text_config=dict(rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[1, 1, 0]))),
    # mlp_layer_types defaults to None, which the decoder indexes: one dense layer, then MoE (as DeepSeek-V2)
    "deepseek_ocr2": dict(text_config=dict(mlp_layer_types=["dense", "sparse", "sparse", "sparse"])),
    "inkling_mm_model": dict(vision_config=dict(text_hidden_size=32, patch_size=4)),
    "inkling2": dict(vision_config=dict(text_hidden_size=32)),
    "inkling2_loop": dict(vision_config=dict(text_hidden_size=32)),
}
_QWEN4 = dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4,
              hc_lowrank=8)
# the default Gemma-4 is dense: turn the MoE block on (as the 26B-A4B checkpoint does); global_head_dim feeds the
# per-layer config of the full-attention layers
_GEMMA4 = dict(enable_moe_block=True, moe_intermediate_size=16, global_head_dim=16, hidden_size_per_layer_input=8,
               vocab_size_per_layer_input=96)
# Dots-3 sliding-window layers take their MLA sizes from swa_* kwargs (head_dim = nope + rope)
_DOTS3 = dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16, swa_kv_lora_rank=16,
              swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=8)
TINY_OVERRIDES |= {
    "dots3_note_text": _DOTS3,
    # its vision adapter maps the tower width to the text width
    "dots3_note": dict(text_config=_DOTS3, vision_config=dict(adapter_in_dim=16, adapter_out_dim=32),
                       audio_config=dict(adapter_input_size=16, adapter_out_dim=32)),
    # ernie's rotary interleaves equal height and width sections, then time: over head_dim / 2 = 4 frequencies
    "ernie4_5_vl_moe": dict(text_config=dict(moe_intermediate_size=[16, 16], rope_parameters=dict(
        mrope_section=[1, 1, 2]))),
    "hy_v4_vl": dict(text_config=dict(rope_parameters=dict(mrope_section=[1, 1, 2]))),  # sums to rope dim / 2
    "gemma4_text": _GEMMA4,
    "gemma4": dict(text_config=_GEMMA4),
    "diffusion_gemma": dict(text_config=_GEMMA4, canvas_length=16),  # the diffusion canvas it denoises
    "qwen4_exp_text": _QWEN4,
    "qwen4_exp": dict(text_config=_QWEN4),
    # the talker reads shared_expert_intermediate_size and spatial_merge_size, which its config classes do not define;
    # its decoder keeps 128 experts of width 384 in one layer (its config names the count num_local_experts) and its
    # code2wav vocoder a 1536-wide decoder (166 MB at tiny size) unless shrunk like the thinker's
    "qwen3_omni_moe": dict(talker_config=dict(spatial_merge_size=2,
                                              text_config=dict(shared_expert_intermediate_size=16, num_local_experts=8,
                                                               num_experts_per_tok=2, moe_intermediate_size=16,
                                                               num_hidden_layers=2)),
                           thinker_config=dict(vision_start_token_id=151652), code2wav_config=dict(decoder_dim=32)),
    # its model reads vision_start_token_id, which Qwen3OmniMoeThinkerConfig does not define (real checkpoints carry
    # it in thinker_config; Qwen2.5-Omni's default)
    "qwen3_omni_moe_thinker": dict(vision_start_token_id=151652),
    "step3p7": dict(text_config=dict(sliding_window=16)),
    "glm5_next": dict(text_config=_INDEXER | dict(qk_rope_head_dim=0, linear_head_dim=8, linear_num_heads=4)),
}

# families whose default config mixes MoE decoder layers with dense / mamba / conv layers (first_k_dense_replace,
# mlp_layer_types, hybrid block patterns): their tiny model keeps at least one non-MoE decoder layer
MIXED_LAYERS = frozenset({
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_ocr2", "deepseek_v3", "deepseek_v32", "dots3_note",
    "dots3_note_text", "ergo", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "flint", "glm4_moe", "glm4_moe_lite",
    "glm4v_moe", "glm5_next", "glm_moe_dsa", "hy_v3", "hy_v4", "hy_v4_vl", "jamba", "kimi_linear", "laguna",
    "lfm2_moe", "mimo_v2_flash", "minicpm5_moe", "mistral_large4", "nemotron_h", "step3p7", "unlimited_ocr",
})

# families the matrices do not build, with the reason they report (none with transformers 5.24 and 5.25:
# Qwen3-Omni-MoE's whole checkpoint, here until session 20, runs through its thinker, `io/stock.runnable`)
NOT_BUILDABLE: dict[str, str] = {}

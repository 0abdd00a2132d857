"""Tiny random MoE checkpoints built from the real transformers configs of every supported family.

Used by `moeprune demo` (until the trained testbed exists), the tests and the benchmarks. Nothing is downloaded.
Router weights get a larger scale than the default init so routing is not near-uniform (ties would make
top-k choices fragile in equivalence tests).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

COMMON = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              vocab_size=96, max_position_embeddings=128, tie_word_embeddings=False,
              initializer_range=0.1)

TOKENIZER_CHARS = "▁" + string.ascii_letters + string.digits + ".,;:!?'\"()-\n"

# family -> config overrides (E=8 everywhere so plans are comparable; groups where the router has them)
FAMILY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                      num_hidden_layers=3, mlp_only_layers=[0]),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, norm_topk_prob=False, num_hidden_layers=2),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, num_hidden_layers=2),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16, num_hidden_layers=2,
                  pad_token_id=0, eos_token_id=1, bos_token_id=None),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2,
                        topk_group=1, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=3),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, num_hidden_layers=2,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "qwen3_vl_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                         num_hidden_layers=2, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2, topk_group=1,
                     first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                     num_hidden_layers=3),
}


# vision-language families: the text decoder config nests under text_config, next to a tiny vision tower
NESTED = {
    "qwen3_vl_moe": dict(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, deepstack_visual_indexes=[0]),
    ),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    if family in NESTED:
        return AutoConfig.for_model(family, text_config=kwargs, **NESTED[family])
    return AutoConfig.for_model(family, **kwargs)


@torch.no_grad()
def tiny_model(family: str, seed: int = 0, router_scale: float = 4.0, **overrides):
    """A randomly initialised model of `family` with sharper routers and non-zero correction biases."""
    from moeprune.io.stock import auto_class

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = auto_class(config).from_config(config, dtype=torch.float32).eval()
    sharpen_routers(model, router_scale)
    return model


@torch.no_grad()
def sharpen_routers(model: torch.nn.Module, router_scale: float = 4.0, routers=()) -> set[int]:
    """Re-draw router weights at std `router_scale / sqrt(H)` (routing far from uniform, so top-k choices are not
    fragile ties) and give biases non-zero values; return the ids of the tensors it touched.

    Router weights are the 2-D parameters named `*gate.weight` / `*router.weight` (not shared-expert gates), plus
    any extra 2-D `routers` tensors a caller found structurally (`moeprune.tiny_families`); biases are parameters
    named `*router.bias` / `*_bias` (N(0, 0.1)) and `e_score_correction_bias` buffers (N(0, 0.05)).
    """
    touched: set[int] = set()
    for name, p in model.named_parameters():
        if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2 and "shared" not in name:
            p.normal_(0, router_scale / p.shape[1] ** 0.5)
            touched.add(id(p))
        elif name.endswith(("router.bias", "_bias")) and p.dim() in (1, 2):
            p.normal_(0, 0.1)
            touched.add(id(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0, 0.05)
            touched.add(id(b))
    for w in routers:
        if id(w) not in touched and w.dim() == 2:
            w.normal_(0, router_scale / w.shape[1] ** 0.5)
            touched.add(id(w))
    return touched


def tiny_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny vocabulary (96): <pad>=0, </s>=1, <unk>=2, then
    '▁' (space), letters, digits and common punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(TOKENIZER_CHARS)}
    assert len(vocab) <= COMMON["vocab_size"]
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def save_tiny(family: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
              max_shard_size: str = "5GB", with_tokenizer: bool = False, **overrides) -> Path:
    """Build and save a tiny checkpoint to `path` (with `tiny_tokenizer()` when `with_tokenizer`)."""
    path = Path(path)
    model = tiny_model(family, seed=seed, **overrides).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path

"""Which moeprune families convert to GGUF, under which llama.cpp architecture name, and what llama.cpp assumes.

`GGUF_FAMILIES` lists the model types whose conversion moeprune has measured end to end (converter, structural
check, llama.cpp logits against transformers: `tests/test_gguf_llama.py`, `benchmarks/gguf_export.py`).
Each says:

    arch      general.architecture that llama.cpp writes for it
    hparams   config keys transformers implies but the converter reads explicitly, set when config.json lacks them
    rules     config conditions llama.cpp's graph hard-codes: a checkpoint that breaks one is refused (llama.cpp
              would load it and compute something else)
    cautions  known, measured differences that llama.cpp's users accept: converted, with a warning

Families measured wrong in llama.cpp (Llama-4, dots.llm1) are listed with a rule that always refuses, naming the
measurement.

A model type not listed still converts when llama.cpp's converter registers its architecture: the structural
check runs, and the log says the family is unmeasured (`--verify` compares logits). One the converter does not
know is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Rule = Callable[[dict], str | None]  # config dict -> why llama.cpp would compute something else (None: fine)


def _norm_topk(cfg: dict) -> str | None:
    if cfg.get("norm_topk_prob") is False:
        return ("llama.cpp's qwen3moe graph always renormalises the top-k routing weights (every released Qwen3-MoE "
                "has norm_topk_prob true); this checkpoint has norm_topk_prob false")
    return None


def _no_gqa(cfg: dict) -> str | None:
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    if kv != heads:
        return (f"llama.cpp's olmoe q/k norms span all {heads} heads (no grouped KV, as the released OLMoE); this "
                f"checkpoint has {kv} KV heads")
    return None


def _yarn_truncate(cfg: dict) -> str | None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type") == "yarn" and rope.get("truncate") is False:
        return ("YaRN with truncate false (gpt-oss's own setting): llama.cpp rounds the YaRN correction range to "
                "integers, transformers and OpenAI's reference do not, so attention differs slightly at every "
                "position after the first (measured on a tiny gpt-oss: max |Δlogit| 7e-2 of the largest logit; 5e-6 "
                "with truncate true). vLLM and SGLang fixed this; this llama.cpp has not")
    return None


def _measured_wrong(why: str) -> Rule:
    """A family whose GGUF llama.cpp loads but computes differently (or cannot load), as measured."""
    return lambda cfg: why + " (benchmarks/results/gguf_export.md); use transformers or vLLM for it"


@dataclass(frozen=True)
class GgufFamily:
    arch: str
    hparams: dict = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    cautions: tuple[Rule, ...] = ()
    works: bool = True  # False: measured wrong in llama.cpp, always refused

    def refusal(self, cfg: dict) -> str | None:
        return next((why for rule in self.rules if (why := rule(cfg))), None)

    def caution(self, cfg: dict) -> str | None:
        return next((why for rule in self.cautions if (why := rule(cfg))), None)


GGUF_FAMILIES: dict[str, GgufFamily] = {
    "qwen2_moe": GgufFamily("qwen2moe"),
    "qwen3_moe": GgufFamily("qwen3moe", rules=(_norm_topk,)),
    "mixtral": GgufFamily("llama"),  # llama.cpp runs Mixtral as a llama model with experts
    "olmoe": GgufFamily("olmoe", rules=(_no_gqa,)),
    "deepseek_v2": GgufFamily("deepseek2"),
    "deepseek_v3": GgufFamily("deepseek2", hparams={"scoring_func": "sigmoid"}),
    "glm4_moe": GgufFamily("glm4moe"),
    "gpt_oss": GgufFamily("gpt-oss", cautions=(_yarn_truncate,)),
    # converted by llama.cpp's converter, but measured wrong in llama.cpp on moeprune's tiny models
    "llama4_text": GgufFamily("llama4", works=False, rules=(_measured_wrong(
        "llama.cpp's llama4 output differs from transformers' (max |Δlogit| 0.5 of the largest logit, top-1 "
        "agreement 0.69 at f32)"),)),
    "dots1": GgufFamily("dots1", works=False, rules=(_measured_wrong(
        "llama.cpp cannot load the converted dots1 file"),)),
}


def working_families() -> list[str]:
    """The model types measured to convert and run in llama.cpp as in transformers."""
    return sorted(name for name, fam in GGUF_FAMILIES.items() if fam.works)

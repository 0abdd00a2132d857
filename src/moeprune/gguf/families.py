"""Which moeprune families convert to GGUF, and under which llama.cpp architecture name.

`GGUF_ARCH` lists the model types whose conversion moeprune has measured end to end (converter, structural
check, llama.cpp logits against transformers: `tests/test_gguf_llama.py`, `benchmarks/gguf.py`). A model type not
listed still converts when llama.cpp's converter registers its architecture (`Converter.architectures()`): the
structural check runs, and the log says the family is unmeasured. One the converter does not know is refused.
"""

from __future__ import annotations

# model_type -> general.architecture that llama.cpp writes for it
GGUF_ARCH: dict[str, str] = {
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "mixtral": "llama",  # llama.cpp runs Mixtral as a llama model with experts
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "glm4_moe": "glm4moe",
    "gpt_oss": "gpt-oss",
}

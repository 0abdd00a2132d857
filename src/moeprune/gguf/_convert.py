"""Run llama.cpp's `convert_hf_to_gguf.py` in this (sub)process: `python _convert.py ROOT CONVERTER-ARGS...`.

Standalone on purpose (imports nothing from moeprune): `gguf/export.py` runs it as a child process, so the
converter's `sys.path` entries (its `conversion/` package, its own `gguf-py`) and its logging never leak into the
caller.

One change to the converter's behaviour: it names a BPE tokenizer's pre-tokenizer by hashing the token ids of a
fixed text, which only works for tokenizers it was updated for; any other (a locally trained tokenizer such as the
moeprune testbed's) stops the conversion. When the hash is unknown *and* `tokenizer.json` declares exactly the
GPT-2 byte-level pre-tokenizer (`ByteLevel`, GPT-2 regex, no prefix space, no normalizer), the pre-tokenizer is
"gpt-2", the one llama.cpp implements with that same regex; anything else still fails as the converter says.

And config keys that transformers implies but the converter reads explicitly (`$MOEPRUNE_GGUF_HPARAMS`, a JSON
object from `gguf/families.py`) are set where config.json lacks them, e.g. DeepSeek-V3's `scoring_func: sigmoid`
(transformers 5 always routes V3 by sigmoid and does not write the key; without it llama.cpp uses softmax).
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys
from pathlib import Path

SCRIPT = "convert_hf_to_gguf.py"


def gpt2_byte_level(tokenizer_json: Path) -> bool:
    """True when the file's normalizer is empty and its pre-tokenizer is GPT-2's byte-level split, alone."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))


def main(argv: list[str]) -> None:
    root = Path(argv[0]).resolve()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import conversion.base as base  # the converter's own package

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if gpt2_byte_level(Path(self.dir_model) / "tokenizer.json"):
                logging.getLogger("moeprune-gguf").warning(
                    "pre-tokenizer not in llama.cpp's hash list; tokenizer.json declares GPT-2's byte-level split, "
                    "so it is written as 'gpt-2'")
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    defaults = json.loads(os.environ.get("MOEPRUNE_GGUF_HPARAMS") or "{}")
    if defaults:
        load = base.ModelBase.load_hparams

        def load_hparams(dir_model, is_mistral_format):
            config = load(dir_model, is_mistral_format)
            for key, value in defaults.items():
                config.setdefault(key, value)
            return config

        base.ModelBase.load_hparams = staticmethod(load_hparams)
    sys.argv = [str(root / SCRIPT), *argv[1:]]
    runpy.run_path(str(root / SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])

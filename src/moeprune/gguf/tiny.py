"""Tiny family checkpoints that llama.cpp's converter accepts: for the GGUF tests and `benchmarks/gguf_export.py`.

The converter needs a real vocabulary: the character-level test tokenizer (`tiny.tiny_tokenizer`, Metaspace) is
none it knows, so these get a byte-level BPE tokenizer (the testbed's kind, GPT-2 pre-tokenizer) trained on this
package's own source text, `VOCAB` entries, plus the special tokens a family's converter looks up by name.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

VOCAB = 320  # 256 bytes + 2 specials + merges; the tiny models' vocab_size is set to this
# tokens a family's vocab writer reads by name (GLM: `_set_vocab_glm`)
FAMILY_SPECIALS = {"glm4_moe": ("[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>")}
# shapes of the released models where llama.cpp assumes them: OLMoE's q/k norms span all heads (no GQA)
FAMILY_OVERRIDES: dict[str, dict] = {"olmoe": {"num_key_value_heads": 4}}


@functools.cache
def _training_text() -> tuple[str, ...]:
    import moeprune.gguf.check as check
    import moeprune.gguf.export as export
    import moeprune.gguf.llama as llama

    return tuple(inspect.getsource(m) for m in (check, export, llama))


def byte_bpe_tokenizer(specials: tuple[str, ...] = ()):
    """A deterministic byte-level BPE tokenizer of `VOCAB` ids (specials included)."""
    from moeprune.testbed.tokenizer import train_tokenizer

    tok = train_tokenizer(list(_training_text()), VOCAB - len(specials))
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def save_tiny_for_gguf(model_type: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    """The tiny random `model_type` model (`tiny_families`) with vocab `VOCAB` and a convertible tokenizer."""
    from moeprune.tiny_families import tiny_family_model

    path = Path(path)
    overrides = {**FAMILY_OVERRIDES.get(model_type, {}), **overrides}
    model = tiny_family_model(model_type, seed=seed, vocab_size=VOCAB, **overrides)
    model.save_pretrained(path)
    byte_bpe_tokenizer(FAMILY_SPECIALS.get(model_type, ())).save_pretrained(path)
    return path

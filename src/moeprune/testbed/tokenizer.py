"""A byte-level BPE tokenizer trained locally on the testbed's training text, saved as a normal HF tokenizer.

Byte-level: any text tokenises (no unknown token). Special tokens: `<pad>` = 0, `</s>` = 1 (EOS, appended after
every document by the calibration and evaluation readers). Training on the same text gives the same merges.
"""

from __future__ import annotations

SPECIAL = ["<pad>", "</s>"]


def train_tokenizer(texts: list[str], vocab_size: int):
    """texts: training documents -> `PreTrainedTokenizerFast` with `vocab_size` entries (incl. 256 bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1 << 20, clean_up_tokenization_spaces=False)

"""llama.cpp (through llama-cpp-python, CPU) on a GGUF, and the check that it computes what transformers computes.

`verify_gguf(checkpoint, gguf, outtype)` feeds the same token ids to both (no tokenizer in between, so only the
model is compared) and measures, per prompt, over every position t and vocabulary entry v:

    rel = max_t,v |z_llama[t, v] − z_hf[t, v]| / max_t,v |z_hf[t, v]|        (logits z)
    top-1 agreement = mean_t [argmax_v z_llama[t] == argmax_v z_hf[t]]
    greedy = the G-token greedy continuations of both are identical

It passes when rel ≤ `TOLERANCE[outtype]` for every prompt and, for f32, every greedy continuation is identical
(16-bit and 8-bit weights move near-ties, so there greedy agreement is reported, not required). The reference is
the checkpoint as stored, so an outtype narrower than the stored weights adds its rounding to llama.cpp's own
arithmetic. Measured (`benchmarks/gguf_export.py`): f32 ≤ 5e-6 on every family (llama.cpp keeps the KV cache in f32
here); on the trained testbed (f32 weights) f16 3.7e-4, bf16 6.6e-2, q8_0 6.9e-2 with top-1 agreement ≥ 0.99.
The bounds leave a margin over those; tiny random models with sharpened routers flip experts under bf16 / q8_0
rounding and can exceed them, trained models did not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeprune.errors import MoePruneError

INSTALL_HINT = "pip install 'moeprune[gguf]' (builds llama-cpp-python from source once; pip caches the wheel)"
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 1.5e-1, "q8_0": 1.5e-1}
# fixed prompts: code, prose, arithmetic, a JSON record (each model's own tokenizer turns them into ids)
VERIFY_TEXTS = (
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
    "The interpreter reads the whole module before it runs any of it, so a syntax error anywhere stops it.",
    "417 + 2896 = 3313\n12 * 31 = 372\n(5 + 7) * 3 =",
    '{"id": 1042, "name": "Ada Lovelace", "email": "ada.lovelace@example.org", "age": 36, "born":',
)
GREEDY_TOKENS = 16


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise MoePruneError(f"running a GGUF needs llama-cpp-python ({e}); install it with: {INSTALL_HINT}") from e
    return llama_cpp


class LlamaCpp:
    """A GGUF loaded by llama.cpp on the CPU: next-token logits for every position, greedy decoding by ids."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 1):
        llama_cpp = import_llama_cpp()
        f32 = llama_cpp.GGML_TYPE_F32  # the KV cache is f16 by default: keep it exact, the weights are compared
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=0, type_k=f32, type_v=f32, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        """ids [T] -> logits [T, V] (row t predicts token t+1)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)  # [T, V]

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of `ids`: `new_tokens` ids, no early stop (ties -> the lowest id, as torch)."""
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            self.llm.eval([nxt])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)


@dataclass(frozen=True)
class LogitCheck:
    outtype: str
    rel: float  # worst prompt's max |Δ logit| / max |logit|
    top1: float  # mean top-1 agreement over all positions
    greedy_same: int  # prompts whose greedy continuation is identical
    prompts: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.rel <= self.tolerance and (self.outtype != "f32" or self.greedy_same == self.prompts)

    def line(self) -> str:
        return (f"llama.cpp vs transformers ({self.outtype}): max |Δlogit|/max|logit| {self.rel:.2e} (tolerance "
                f"{self.tolerance:.0e}), top-1 agreement {self.top1:.3f}, identical greedy continuations "
                f"{self.greedy_same}/{self.prompts} -> {'PASS' if self.passed else 'FAIL'}")


def verify_gguf(checkpoint: str | Path, gguf: str | Path, outtype: str, texts: tuple[str, ...] = VERIFY_TEXTS,
                greedy_tokens: int = GREEDY_TOKENS) -> LogitCheck:
    """llama.cpp on `gguf` against stock transformers on `checkpoint`, on `texts` (see the module docstring)."""
    import torch

    from moeprune.calibration.run import load_tokenizer
    from moeprune.eval.generate import greedy_continuations
    from moeprune.io.load import load_model

    tok = load_tokenizer(Path(checkpoint), None)
    model = load_model(checkpoint, dtype="float32", device="cpu")
    runner = LlamaCpp(gguf, n_ctx=max(64, 2 * max(len(tok(t)["input_ids"]) for t in texts) + greedy_tokens))
    rels, agree, same = [], [], 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]  # [T]
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().numpy()  # [T, V]
        got = runner.logits(ids)  # [T, V]
        rels.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
        agree.extend((got.argmax(-1) == ref.argmax(-1)).tolist())
        ref_greedy = greedy_continuations(model, torch.tensor([ids]), greedy_tokens)[0].tolist()  # [G]
        same += int(runner.greedy(ids, greedy_tokens) == ref_greedy)
    return LogitCheck(outtype, max(rels), float(np.mean(agree)), same, len(texts), TOLERANCE[outtype])

"""llama.cpp (llama-cpp-python, CPU) runs the GGUF exports: next-token logits and greedy continuations against stock
transformers `from_pretrained` of the same export, computed here directly (not through `gguf/llama.py`)."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeprune.gguf.export as export_mod
from moeprune.gguf import GgufOptions, export_gguf
from moeprune.gguf.llama import verify_gguf
from moeprune.gguf.tiny import save_tiny_for_gguf

torch.set_num_threads(1)

PROMPTS = ("def add(a, b):\n    return a + b\n", "12 + 30 = 42\n7 * 6 =", '{"id": 7, "name": "Ada Lovelace", "age":')
TOL = {"f32": 1e-4, "f16": 1e-2}  # of the largest |logit|; f16 storage keeps 11 significant bits
# families llama.cpp converts, as released models configure them (gpt-oss: see test_gpt_oss_yarn_caution)
FAMILIES = {"qwen2_moe": {}, "mixtral": {}, "olmoe": {}, "deepseek_v3": {}, "glm4_moe": {},
            "gpt_oss": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                                            "original_max_position_embeddings": 4096}}}


def _llama(path) -> llama_cpp.Llama:
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=1, n_threads_batch=1,
                           type_k=f32, type_v=f32, verbose=False)


def _compare(export, gguf, outtype: str, greedy: int = 8) -> None:
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    llm = _llama(gguf)
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False) == ids  # the GPT-2 pre-tokenizer, as written
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()  # [T, V]
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])  # [T, V]
        assert np.abs(ref).max() > 0.1  # a model that says something
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= TOL[outtype], (text, rel)
        if outtype == "f32":
            with torch.no_grad():
                want = model.generate(torch.tensor([ids]), max_new_tokens=greedy, min_new_tokens=greedy,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
            llm.reset()
            gen = llm.generate(ids, temp=0.0, top_k=1)
            assert [next(gen) for _ in range(greedy)] == want, text


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_pruned_testbed_runs_in_llama_cpp_as_in_transformers(gguf_pruned, gguf_pruned_file, outtype, tmp_path):
    _, export = gguf_pruned
    f16 = export_gguf(export, tmp_path / "p.gguf", GgufOptions(outtype=outtype)).path if outtype == "f16" else None
    gguf = f16 or gguf_pruned_file[1]
    _compare(export, gguf, outtype)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_runs_in_llama_cpp_as_in_transformers(family, tmp_path):
    src = save_tiny_for_gguf(family, tmp_path / family, seed=3, **FAMILIES[family])
    summary = export_gguf(src, tmp_path / f"{family}.gguf", GgufOptions(outtype="f32"))
    assert summary.experts == 8
    _compare(src, summary.path, "f32")


def test_verify_passes_the_right_file_and_fails_a_wrong_one(gguf_pruned, gguf_pruned_file, tmp_path):
    original, export = gguf_pruned
    assert verify_gguf(export, gguf_pruned_file[1], "f32").passed
    other = export_gguf(original, tmp_path / "original.gguf", GgufOptions(outtype="f32")).path  # 8 experts, not 6
    check = verify_gguf(export, other, "f32")
    assert not check.passed and check.rel > 1e-3


def test_gpt_oss_yarn_caution(tmp_path, monkeypatch):
    """gpt-oss's own YaRN setting (truncate false): llama.cpp rounds the correction range, transformers does not.
    The export warns, and the difference is real (if llama.cpp adopts truncate, drop the caution)."""
    src = save_tiny_for_gguf("gpt_oss", tmp_path / "g", seed=3)
    warned = []
    monkeypatch.setattr(export_mod.logger, "warning", lambda msg, *args: warned.append(msg % args))
    path = export_gguf(src, tmp_path / "g.gguf", GgufOptions(outtype="f32")).path
    assert any("YaRN with truncate false" in w for w in warned)
    assert verify_gguf(src, path, "f32").rel > 1e-3

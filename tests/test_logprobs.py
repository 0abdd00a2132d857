"""`eval/logprobs.compare_logprobs`: transformers against itself (through what vLLM returns: top-k and the prompt
token) agrees exactly; the vLLM adapter reads vLLM's output layout (prompt_logprobs[0] is None, the last row is the
generated token's) without an off-by-one, on a stand-in `vllm.LLM` that is transformers itself; a difference is
measured and the bad inputs are refused."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.eval.logprobs import (
    Scored,
    as_top_k,
    compare_logprobs,
    top_k_rows,
    transformers_provider,
    vllm_provider,
)
from moeprune.tiny import tiny_model

PROMPTS = [[5, 17, 3, 40, 9, 22, 7], [11, 2], [30]]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe", seed=1).eval()


def test_transformers_against_itself_is_exact(model):
    ref = transformers_provider(model)
    check = compare_logprobs(ref, as_top_k(ref), PROMPTS, runtime="transformers", dtype="float32", k=4,
                             greedy_tokens=5)
    assert check.max_abs == 0.0 and check.mean_abs == 0.0 and check.top1 == 1.0 and check.passed
    assert (check.greedy_same, check.greedy_match, check.prompts) == (3, 1.0, 3)
    assert check.positions == sum(map(len, PROMPTS))
    # top-4 per row, plus the next prompt token where it is not among them
    assert 4 * check.positions <= check.compared <= 5 * check.positions
    assert "max |Δ logprob| 0.00e+00" in check.line() and check.line().endswith("PASS")
    assert check.to_dict()["passed"] is True


def test_a_difference_is_measured(model):
    ref = transformers_provider(model)

    def shifted(prompts, k, new_tokens):  # one log-prob moved by 0.2, one greedy token changed
        out = as_top_k(ref)(prompts, k, new_tokens)
        row = out[0].rows[2]
        v = next(iter(row))
        row[v] += 0.2
        out[1].greedy[-1] += 1
        return out

    check = compare_logprobs(ref, shifted, PROMPTS, runtime="x", dtype="bfloat16", k=3, greedy_tokens=4)
    assert check.max_abs == pytest.approx(0.2) and check.per_prompt[1:] == (0.0, 0.0)
    assert check.greedy_same == 2 and check.greedy_match == pytest.approx((1 + 0.75 + 1) / 3)
    assert check.passed  # under bf16's bound; greedy agreement is not required of a 16-bit candidate
    strict = compare_logprobs(ref, shifted, PROMPTS, runtime="x", dtype="bfloat16", k=3, greedy_tokens=4,
                              tolerance=0.1)
    assert not strict.passed and strict.line().endswith("FAIL")


def test_float32_needs_identical_greedy(model):
    ref = transformers_provider(model)

    def other_greedy(prompts, k, new_tokens):
        out = as_top_k(ref)(prompts, k, new_tokens)
        out[0].greedy[0] += 1
        return out

    check = compare_logprobs(ref, other_greedy, PROMPTS, runtime="x", dtype="float32", greedy_tokens=3)
    assert check.max_abs == 0.0 and not check.passed


class _FakeLLM:
    """What `vllm.LLM.generate` returns, computed by transformers: RequestOutput-like objects."""

    def __init__(self, model):
        self.model = model

    def generate(self, reqs, params, use_tqdm=True):
        out = []
        for req in reqs:
            ids = req["prompt_token_ids"]
            x = torch.tensor([ids])
            with torch.no_grad():
                rows = torch.log_softmax(self.model(x).logits[0].float(), -1).double().numpy()  # [T, V]
            p = params.kw
            gen = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=p["max_tokens"],
                                      min_new_tokens=p["max_tokens"], do_sample=False, pad_token_id=0,
                                      eos_token_id=None)[0, len(ids):].tolist()
            prompt_lp = gen_lp = None
            if p.get("prompt_logprobs"):
                sparse = top_k_rows(rows, ids, p["prompt_logprobs"])
                lp = [{v: SimpleNamespace(logprob=x, rank=1) for v, x in r.items()} for r in sparse]
                prompt_lp = [None, *lp[:-1]]  # row t-1 predicted prompt token t
                last = dict(lp[-1])
                last.setdefault(gen[0], SimpleNamespace(logprob=float(rows[-1, gen[0]]), rank=1))
                gen_lp = [last]
            out.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt_lp,
                                       outputs=[SimpleNamespace(token_ids=gen, logprobs=gen_lp)]))
        return out


def test_vllm_adapter_reads_vllm_layout(model, monkeypatch):
    params = type("SamplingParams", (), {"__init__": lambda self, **kw: setattr(self, "kw", kw)})
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=params))
    check = compare_logprobs(transformers_provider(model), vllm_provider(_FakeLLM(model)), PROMPTS, runtime="vllm",
                             dtype="bfloat16", k=3, greedy_tokens=6)
    assert check.max_abs == 0.0 and check.top1 == 1.0 and check.greedy_same == 3


def test_refusals(model):
    ref = transformers_provider(model)
    with pytest.raises(MoePruneError, match="at least one prompt"):
        compare_logprobs(ref, ref, [], runtime="x", dtype="float32")
    with pytest.raises(MoePruneError, match="no tolerance for dtype 'int4'"):
        compare_logprobs(ref, ref, PROMPTS, runtime="x", dtype="int4")

    def top_only(prompts, k, new_tokens):  # drops the prompt token that vLLM always adds
        return [Scored([{int(np.argmax(r)): float(r.max())} for r in s.rows], s.greedy)
                for s in ref(prompts, k, new_tokens)]

    with pytest.raises(MoePruneError, match="lacks the next prompt token"):
        compare_logprobs(ref, top_only, [[3, 3, 3]], runtime="x", dtype="float32")
    with pytest.raises(MoePruneError, match="must give a \\[T, V\\] array"):
        compare_logprobs(as_top_k(ref), ref, PROMPTS, runtime="x", dtype="float32")

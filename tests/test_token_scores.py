"""Next-token scores a chunk of positions at a time (`eval/token_scores.py`) equal one float64 cross-entropy over the
model's own whole-sequence logits, per window and with padding; the head really runs on chunks (no logits tensor
wider than a chunk), and model classes without `logits_to_keep` get the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from head_spy import spy_head_logits
from moeprune.calibration.engine import capture, run_layers
from moeprune.eval import token_scores
from moeprune.models import get_adapter
from moeprune.pipeline.verify import seeded_inputs
from moeprune.tiny import tiny_model
from moeprune.tiny_families import tiny_family_model


def _reference(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """Per window: NLL (float64 cross-entropy), correct predictions and counted positions, by hand."""
    nll, correct, counted = [], [], []
    for b in range(ids.shape[0]):
        keep = (mask[b, :-1] * mask[b, 1:]).bool()  # [L-1]
        pred, target = logits[b, :-1][keep].double(), ids[b, 1:][keep]
        nll.append(float(F.cross_entropy(pred, target, reduction="sum")))
        correct.append(int((pred.argmax(-1) == target).sum()))
        counted.append(int(keep.sum()))
    return nll, correct, counted


def _case(family: str):
    model = (tiny_model(family, seed=2) if family == "qwen3_moe" else tiny_family_model(family, seed=2)).eval()
    adapter = get_adapter(model.config, model=model)
    inputs = seeded_inputs(96, batch=3, seq_len=14, seed=4)
    inputs["attention_mask"][2, :5] = 0  # a left-padded row
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits  # [B, L, V] the model's own forward
    batch = capture(model, adapter, inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        for _ in run_layers(model, adapter, [batch]):
            pass
    return model, adapter, inputs, logits, batch.hidden


@pytest.mark.parametrize("family", ["qwen3_moe", "glm_moe_dsa", "llama4_text"])
def test_head_scores_in_chunks_equal_one_cross_entropy(family, monkeypatch):
    model, adapter, inputs, logits, hidden = _case(family)
    B, L, V = logits.shape
    max_bytes = 16 * B * V * 3  # 3 positions per chunk
    assert token_scores.chunk_positions(B, V, max_bytes) == 3
    calls = spy_head_logits(monkeypatch)  # score_head imports head_logits from the engine when it runs
    with torch.no_grad():
        got = token_scores.score_head(model, adapter, inputs, hidden, max_bytes=max_bytes)
    widths = [w for w, _ in calls]
    assert widths and max(widths) == 3 and sum(widths) == L - 1  # chunks of the L−1 predicting positions
    nll, correct, counted = _reference(logits, inputs["input_ids"], inputs["attention_mask"])
    assert got.counted.tolist() == counted and counted[2] < counted[0]
    assert got.correct.tolist() == correct
    assert got.nll.tolist() == pytest.approx(nll, rel=1e-5)  # layer by layer vs one forward: float32 rounding


def test_logits_in_chunks_equal_one_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 11, 50, generator=g) * 3  # [B, L, V]
    ids = torch.randint(0, 50, (4, 11), generator=g)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    got = token_scores.score_logits(logits, ids, mask, max_bytes=16 * 4 * 50 * 2)  # 2 positions per chunk
    nll, correct, counted = _reference(logits, ids, mask)
    assert got.counted.tolist() == counted and got.correct.tolist() == correct
    assert got.nll.tolist() == pytest.approx(nll, rel=1e-12)  # the same float64 values, summed in another order


def test_a_model_class_without_logits_to_keep_gets_the_same_scores(monkeypatch):
    """The fallback (all logits at once, the float64 work chunked) for a class whose forward lacks the argument."""
    model, adapter, inputs, logits, hidden = _case("qwen3_moe")
    cls = type(model)
    forward = cls.forward

    def plain_forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        assert "logits_to_keep" not in kwargs
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)

    monkeypatch.setattr(cls, "forward", plain_forward)
    with torch.no_grad():
        got = token_scores.score_head(model, adapter, inputs, hidden, max_bytes=1)
    nll, correct, counted = _reference(logits, inputs["input_ids"], inputs["attention_mask"])
    assert got.counted.tolist() == counted and got.correct.tolist() == correct
    assert got.nll.tolist() == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm_moe_dsa", "llama4_text"])
def test_in_memory_scores_equal_one_cross_entropy(family):
    """`score_model`: the decoder layers once, the last one's output captured, the head in chunks of 2 positions."""
    model, adapter, inputs, logits, _ = _case(family)
    with torch.no_grad():
        got = token_scores.score_model(model, adapter, inputs, max_bytes=16 * 3 * logits.shape[-1] * 2)
    nll, correct, counted = _reference(logits, inputs["input_ids"], inputs["attention_mask"])
    assert got.counted.tolist() == counted and got.correct.tolist() == correct
    assert got.nll.tolist() == pytest.approx(nll, rel=1e-5)


def test_evaluate_sets_scores_a_model_without_an_adapter_on_its_whole_logits():
    """A dense model (no MoE adapter) is scored as before: one forward, its whole logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moeprune.calibration.data import CalibSet
    from moeprune.eval.perplexity import evaluate_sets

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    inputs = seeded_inputs(96, batch=3, seq_len=14, seed=4)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    nll, correct, counted = _reference(logits, inputs["input_ids"], inputs["attention_mask"])
    score = evaluate_sets(model, [CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)],
                          batch_size=2)["s"]
    assert score.tokens == sum(counted) and score.nll_sum == pytest.approx(sum(nll), rel=1e-9)
    assert score.accuracy == sum(correct) / sum(counted)

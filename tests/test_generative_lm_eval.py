"""The lm-eval path of the generative tasks equals the native runner: the same items through `moeprune gen-tasks`'
folder and `run_lm_eval`, and through `evaluate(..., generate=True)`, on one tiny model, both greedy and unbatched
(batch size 1: no padding, so no near-tie can flip between the paths). Compared per item (the completions) and per
metric. The tiny tokenizer lacks '=', '+', '{' and friends (they become <unk>), which both paths see alike."""

from __future__ import annotations

import json

import pytest

from moeprune.eval.lm_eval_adapter import run_lm_eval
from moeprune.eval.lm_eval_tasks import write_task_folder
from moeprune.eval.run import EvalOptions, evaluate
from moeprune.tiny import save_tiny

pytestmark = pytest.mark.skipif(__import__("importlib").util.find_spec("lm_eval") is None,
                                reason="lm-eval not installed (moeprune[eval])")

ITEMS = [
    {"domain": "arithmetic", "prompt": "12 + 30 =", "target": " 42"},
    {"domain": "arithmetic", "prompt": "(7 + 5) * 3 =", "target": " 36"},
    {"domain": "records", "prompt": '{"id": 1000, "name": "Ada Knuth",', "target": " ..."},
    {"domain": "python", "prompt": "def area(r):\n    pi = 3\n    x = r * r", "target": "\n    return x\n"},
    {"domain": "python", "prompt": "class A:\n    def f(self):\n        return 1", "target": "\n"},
]


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """The `datasets` cache of the local tasks in a temporary folder (tests leave no files behind)."""
    import datasets.config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets_cache"))
        yield


def test_lm_eval_scores_equal_native_scores(tmp_path):
    ckpt = save_tiny("qwen3_moe", tmp_path / "m", seed=3, with_tokenizer=True, max_position_embeddings=512)
    folder, names = write_task_folder(tmp_path / "tasks", ITEMS)
    web = tmp_path / "web.txt"
    web.write_text("word is word. " * 10)
    native = evaluate(ckpt, EvalOptions((f"web={web}",), seq_len=16, batch_size=1, generate=True,
                                        generate_tasks=str(folder / "tasks.jsonl"))).generative
    lm = run_lm_eval(ckpt, names, include_path=folder, include_defaults=False, batch_size=1, log_samples=True)
    assert set(lm) == {f"moeprune_{t}" for t in native}
    for task, g in native.items():
        prompts = [i["prompt"] for i in ITEMS if i["domain"] == task]
        by_prompt = {s["doc"]["prompt"]: s["filtered_resps"][0] for s in lm.raw["samples"][f"moeprune_{task}"]}
        assert [by_prompt[p] for p in prompts] == g.completions, task
        for metric, value in g.metrics.items():
            assert lm[f"moeprune_{task}"][metric] == pytest.approx(value, abs=1e-12), (task, metric)
    assert any(c for g in native.values() for c in g.completions)  # the model wrote something
    json.dumps(lm)  # the compact result is plain data

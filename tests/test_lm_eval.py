"""`run_lm_eval` / `moeprune lm-eval` against a direct computation, offline, on a local 12-question task.

The reference scores every (question, choice) pair straight from the model's logits: the prompt and the
continuation " <choice>" are turned into ids by the tiny tokenizer's character table (not by the tokenizer and
not by lm-eval), the prompt + continuation run alone through the model, and the continuation's log-probabilities
are summed in float64. lm-eval's per-choice log-likelihoods must match, and its `acc` / `acc_norm` (argmax of the
sums / of the sums per character of the choice) must equal the reference's exactly. The in-memory model, the saved
folder and the CLI (JSON output) are all checked against the same reference."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.eval import lm_eval_adapter
from moeprune.eval.lm_eval_adapter import run_lm_eval
from moeprune.tiny import TOKENIZER_CHARS, save_tiny, tiny_model, tiny_tokenizer

DATA = Path(__file__).parent / "data" / "lm_eval"
TASK = "moeprune_tiny_mc"
FAMILY, SEED = "olmoe", 5
CHAR_IDS = {c: i + 3 for i, c in enumerate(TOKENIZER_CHARS)}  # tiny_tokenizer: <pad>=0, </s>=1, <unk>=2, then these

needs_lm_eval = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lm_eval") is None, reason="lm-eval not installed (moeprune[eval])"
)


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep the `datasets` cache of the local task out of ~/.cache (read from `datasets.config` at call time)."""
    try:
        import datasets.config
    except ImportError:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets_cache"))
        yield


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The task YAML with its data file made absolute (`datasets` resolves relative paths against the cwd)."""
    text = (DATA / f"{TASK}.yaml").read_text()
    assert text.count("test: tiny_mc.jsonl") == 1
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    (out / f"{TASK}.yaml").write_text(text.replace("test: tiny_mc.jsonl", f"test: {DATA / 'tiny_mc.jsonl'}"))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny(FAMILY, tmp_path_factory.mktemp("lm_eval_model") / "m", seed=SEED, with_tokenizer=True)


def char_ids(text: str) -> list[int]:
    """Metaspace + one token per character: a leading '▁', spaces written as '▁'."""
    return [CHAR_IDS["▁"]] + [CHAR_IDS["▁" if c == " " else c] for c in text]


@pytest.fixture(scope="module")
def reference() -> dict:
    """Per-item choice log-likelihoods, predictions and accuracies, computed directly from the model's logits."""
    items = [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]
    model = tiny_model(FAMILY, seed=SEED)
    # the char table is the tiny tokenizer's encoding (precondition of mirroring lm-eval's context/continuation split)
    sample = "Question: " + items[0]["question"] + "\nAnswer: " + items[0]["choices"][0]
    assert tiny_tokenizer().encode(sample) == char_ids(sample)
    lls, correct, correct_norm = [], 0, 0
    with torch.no_grad():
        for it in items:
            ctx = char_ids("Question: " + it["question"] + "\nAnswer:")
            row = []
            for choice in it["choices"]:
                cont = [CHAR_IDS["▁"]] + [CHAR_IDS[c] for c in choice]  # the continuation " <choice>"
                ids = torch.tensor([ctx + cont[:-1]])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
                row.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            norm = [ll / len(c) for ll, c in zip(row, it["choices"], strict=True)]
            for scores in (row, norm):  # exact argmax comparisons need clear winners
                top = sorted(scores, reverse=True)
                assert top[0] - top[1] > 1e-3, (it, scores)
            correct += int(max(range(len(row)), key=row.__getitem__) == it["label"])
            correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["label"])
            lls.append(row)
    n = len(items)
    acc, acc_norm = correct / n, correct_norm / n
    assert 0 < acc < 1 and 0 < acc_norm < 1  # a test that an all-right or all-wrong scorer could not pass
    return {"lls": lls, "acc": acc, "acc_norm": acc_norm, "n": n}


def check_metrics(metrics: dict, ref: dict) -> None:
    assert metrics["acc"] == pytest.approx(ref["acc"], abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(ref["acc_norm"], abs=1e-12)
    for m in ("acc", "acc_norm"):  # sample standard error of a mean of 0/1 scores
        p = ref[m]
        assert metrics[f"{m}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (ref["n"] - 1)), rel=1e-9)
    assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


@needs_lm_eval
def test_in_memory_model_matches_direct_loglikelihoods(task_dir, reference, monkeypatch):
    import datasets.config

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    before = datasets.config.HF_HUB_OFFLINE
    result = run_lm_eval(tiny_model(FAMILY, seed=SEED), [TASK], tokenizer=tiny_tokenizer(), include_path=task_dir,
                         include_defaults=False, batch_size=5, log_samples=True)
    assert list(result) == [TASK]
    check_metrics(result[TASK], reference)
    samples = sorted(result.raw["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == reference["n"]
    for s, want in zip(samples, reference["lls"], strict=True):
        got = [r[0] for r in s["filtered_resps"]]
        assert got == pytest.approx(want, abs=2e-4, rel=1e-5)
    # the offline switches are restored
    assert "HF_DATASETS_OFFLINE" not in os.environ and os.environ["HF_HUB_OFFLINE"] == "0"
    assert datasets.config.HF_HUB_OFFLINE == before


@needs_lm_eval
def test_saved_folder_and_limit(task_dir, checkpoint, reference):
    result = run_lm_eval(checkpoint, TASK, include_path=task_dir, include_defaults=False, batch_size=3)
    check_metrics(result[TASK], reference)
    assert result.raw["n-samples"][TASK]["effective"] == reference["n"]

    # limit: the first 4 documents only
    head = run_lm_eval(str(checkpoint), [TASK], include_path=task_dir, include_defaults=False, limit=4)
    items = [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines()][:4]
    want = sum(max(range(4), key=row.__getitem__) == it["label"] for row, it in zip(reference["lls"][:4], items,
                                                                                        strict=True))
    assert head[TASK]["acc"] == pytest.approx(want / 4, abs=1e-12)


@needs_lm_eval
def test_cli_writes_json(task_dir, checkpoint, reference, tmp_path, capsys):
    out = tmp_path / "lm_eval.json"
    rc = main(["lm-eval", str(checkpoint), "--tasks", TASK, "--include-path", str(task_dir), "--no-builtin-tasks",
               "--batch-size", "4", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert list(data) == [TASK]
    check_metrics(data[TASK], reference)
    table = capsys.readouterr().out
    assert TASK in table and "acc_norm" in table
    assert f"{reference['acc']:.4f}" in table
    assert not list(tmp_path.glob("*.tmp"))


def test_refusals_before_any_work(task_dir, checkpoint, tmp_path, monkeypatch, capsys):
    def forbid(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(lm_eval_adapter, "load_model", forbid)
    model = tiny_model(FAMILY, seed=SEED)
    with pytest.raises(MoePruneError, match="no lm-eval tasks"):
        run_lm_eval(checkpoint, [])
    with pytest.raises(MoePruneError, match="no lm-eval tasks"):
        run_lm_eval(checkpoint, "a,,b")
    with pytest.raises(MoePruneError, match="not an existing folder"):
        run_lm_eval(checkpoint, [TASK], include_path=tmp_path / "missing")
    with pytest.raises(MoePruneError, match="does not exist"):
        run_lm_eval(tmp_path / "no_model", [TASK], include_path=task_dir)
    with pytest.raises(MoePruneError, match="needs its tokenizer"):
        run_lm_eval(model, [TASK], include_path=task_dir)
    with pytest.raises(MoePruneError, match="unknown dtype"):
        run_lm_eval(checkpoint, [TASK], include_path=task_dir, dtype="float8")
    # the CLI prints the message and exits 2
    assert main(["lm-eval", str(checkpoint), "--tasks", "", "--include-path", str(task_dir)]) == 2
    assert "no lm-eval tasks" in capsys.readouterr().err
    assert main(["lm-eval", str(checkpoint), "--tasks", TASK, "--include-path", str(tmp_path / "nope")]) == 2
    assert "--include-path" in capsys.readouterr().err
    assert main(["lm-eval", str(checkpoint), "--tasks", TASK, "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err

    # lm-eval missing: the install hint
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MoePruneError, match=r"pip install 'moeprune\[eval\]'"):
        run_lm_eval(model, [TASK], tokenizer=tiny_tokenizer(), include_path=task_dir, include_defaults=False)


@needs_lm_eval
def test_unknown_task_refused_before_loading(task_dir, checkpoint, monkeypatch):
    def forbid(*args, **kwargs):
        raise AssertionError("the model was loaded before the unknown task was refused")

    monkeypatch.setattr(lm_eval_adapter, "load_model", forbid)
    with pytest.raises(MoePruneError, match=r"unknown lm-eval task.*did you mean moeprune_tiny_mc"):
        run_lm_eval(checkpoint, ["moeprune_tiny_mcq"], include_path=task_dir, include_defaults=False)


@needs_lm_eval
def test_relative_data_file_missing_is_a_clear_error(tmp_path, monkeypatch):
    """The committed YAML names its data file relative to itself; from another working directory `datasets`
    cannot find it, and the error says why."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoePruneError, match="task data file is missing.*working directory"):
        run_lm_eval(tiny_model(FAMILY, seed=SEED), [TASK], tokenizer=tiny_tokenizer(), include_path=DATA,
                    include_defaults=False)


def _direct_lls(model) -> list[list[float]]:
    """Per item, each choice's summed log-probability straight from the model's logits (as `reference`)."""
    items = [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]
    out = []
    with torch.no_grad():
        for it in items:
            ctx = char_ids("Question: " + it["question"] + "\nAnswer:")
            row = []
            for choice in it["choices"]:
                cont = [CHAR_IDS["▁"]] + [CHAR_IDS[c] for c in choice]
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].double(), dim=-1)
                row.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            out.append(row)
    return out


@needs_lm_eval
def test_steering_plan_applies_inside_the_run(task_dir):
    from moeprune.models import get_adapter
    from moeprune.steer.apply import steering
    from moeprune.steer.plan import SteerEntry, SteerPlan

    model = tiny_model(FAMILY, seed=SEED)
    adapter = get_adapter(model.config, model=model)
    plan = SteerPlan(adapter.model_type, adapter.num_experts, adapter.top_k, adapter.routing().kind,
                     tuple(adapter.moe_layers()),
                     tuple(SteerEntry(la, j, "off") for la in adapter.moe_layers() for j in (0, 3)))
    plain = _direct_lls(model)
    with steering(model, plan):
        want = _direct_lls(model)
    assert max(abs(a - b) for pa, pb in zip(plain, want, strict=True) for a, b in zip(pa, pb, strict=True)) > 1e-2
    result = run_lm_eval(model, [TASK], tokenizer=tiny_tokenizer(), include_path=task_dir, include_defaults=False,
                         batch_size=5, log_samples=True, steer=plan)
    samples = sorted(result.raw["samples"][TASK], key=lambda s: s["doc_id"])
    for s, row in zip(samples, want, strict=True):
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(row, abs=2e-4, rel=1e-5)
    assert not any("forward" in adapter.router(adapter.block(model, la)).__dict__ for la in adapter.moe_layers())

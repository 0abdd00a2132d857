"""The testbed: corpus splits, deterministic build, reuse/force, routing report, eval defaults, the demo.

A scaled-down TestbedConfig (tiny model, few steps, small text budgets) keeps every build to seconds; the standard
testbed is measured by `moeprune testbed build` (closing note of issue 5)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.eval.run import EvalOptions, evaluate
from moeprune.testbed import Testbed, TestbedConfig, build_testbed
from moeprune.testbed import build as build_mod
from moeprune.testbed.corpus import SPLITS, arithmetic, build_corpus, english_docs, python_source
from moeprune.testbed.routing import routing_shares, specialisation

SMALL = TestbedConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      num_experts=8, top_k=2, moe_intermediate_size=16, seq_len=32, batch_size=8, steps=12, lr=3e-3,
                      warmup=4, train_chars=30_000, calib_chars=6_000, heldout_chars=6_000, tokenizer_chars=10_000)
BUDGET = {"train": 200_000, "calib": 20_000, "heldout": 20_000}


@pytest.fixture(scope="module")
def small_testbed(tmp_path_factory) -> Testbed:
    return build_testbed(tmp_path_factory.mktemp("tb") / "small", cfg=SMALL)


def test_real_text_splits_share_no_document():
    for make in (python_source, english_docs):
        d = make(BUDGET, 0)
        docs = {s: {p for p in d.splits[s].split("\n\n") if len(p) > 200} for s in SPLITS}
        assert all(docs[s] for s in SPLITS), d.name
        for a in SPLITS:
            for b in SPLITS:
                if a < b:
                    assert not docs[a] & docs[b], (d.name, a, b)
        assert make(BUDGET, 0).splits == d.splits  # deterministic
        assert make(BUDGET, 1).splits["heldout"] != d.splits["heldout"]  # the seed moves the split


def test_generated_arithmetic_is_correct_and_splits_differ():
    d = arithmetic(BUDGET, 0)
    for split in SPLITS:
        for line in d.splits[split].splitlines():
            lhs, rhs = line.split(" = ")
            assert re.fullmatch(r"[0-9+\-*/() ]+", lhs)
            assert eval(lhs) == int(rhs), line  # brute-force check of every generated line
    assert set(d.splits["train"].splitlines()[:200]) != set(d.splits["heldout"].splitlines()[:200])


def test_corpus_has_four_distinct_domains():
    corpus = build_corpus(BUDGET, 0)
    assert [d.name for d in corpus] == ["python", "english", "arithmetic", "records"]
    assert "def " in corpus[0].splits["train"] and "the " in corpus[1].splits["train"]
    assert json.loads(corpus[3].splits["heldout"].splitlines()[0])["email"].endswith("@example.org")


def test_specialisation_against_hand_computed_values():
    E = 4
    same = {"a": {0: np.array([1.0, 1, 1, 1])}, "b": {0: np.array([2.0, 2, 2, 2])}}
    disjoint = {"a": {0: np.array([5.0, 5, 0, 0])}, "b": {0: np.array([0.0, 0, 3, 3])}}
    s_same = specialisation(routing_shares(same))[0]
    s_dis = specialisation(routing_shares(disjoint))[0]
    assert s_same["js_bits"] == pytest.approx(0.0, abs=1e-12) and s_same["purity"] == pytest.approx(0.5)
    assert s_dis["js_bits"] == pytest.approx(1.0) and s_dis["purity"] == pytest.approx(1.0)
    # half-overlapping: p = (.5, .5, 0, 0), q = (0, .5, .5, 0): JS = 0.5 bit; purity = (.5+.5+.5)/2 = 0.75
    half = {"a": {0: np.array([1.0, 1, 0, 0])}, "b": {0: np.array([0.0, 1, 1, 0])}}
    s_half = specialisation(routing_shares(half))[0]
    assert s_half["js_bits"] == pytest.approx(0.5) and s_half["purity"] == pytest.approx(0.75)
    assert routing_shares(half)["a"].shape == (1, E)


def test_build_is_a_stock_checkpoint_with_reports(small_testbed):
    tb = small_testbed
    model = AutoModelForCausalLM.from_pretrained(tb.path)
    tok = AutoTokenizer.from_pretrained(tb.path)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == SMALL.num_experts
    text = "def f(x):\n    return 417 + 3  # the answer"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round trip
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert set(tb.data("heldout")) == {"python", "english", "arithmetic", "records"}
    assert (tb.path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    shares = tb.meta["routing"]["shares"]
    for d in shares.values():
        assert np.allclose(np.asarray(d).sum(axis=1), 1.0, atol=1e-4)
    # the recorded held-out loss is the mean token NLL of the saved model on the held-out windows
    direct = evaluate(tb.path, EvalOptions(tb.specs("heldout"), seq_len=SMALL.seq_len, max_sequences=1 << 20))
    for name, h in tb.meta["heldout"].items():
        assert h["loss"] == pytest.approx(math.log(direct.scores[name].perplexity), rel=1e-6)
    assert tb.meta["heldout_loss_mean"] < math.log(SMALL.vocab_size)  # it learned something


def test_two_builds_give_the_same_held_out_loss(small_testbed, tmp_path):
    again = build_testbed(tmp_path / "again", cfg=SMALL)
    a, b = small_testbed.meta["heldout_loss_mean"], again.meta["heldout_loss_mean"]
    assert abs(a - b) / a < 0.01
    ta = AutoModelForCausalLM.from_pretrained(small_testbed.path).state_dict()
    tb_ = AutoModelForCausalLM.from_pretrained(again.path).state_dict()
    assert max((ta[k] - tb_[k]).abs().max().item() for k in ta) < 1e-4


def test_reuse_force_and_refusals(small_testbed, tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "train_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    assert build_testbed(small_testbed.path, cfg=SMALL).meta == small_testbed.meta  # reused, not retrained
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(MoePruneError, match="not a testbed; choose another --out"):
        build_testbed(tmp_path / "other", cfg=SMALL)
    with pytest.raises(MoePruneError, match="parent folder"):
        build_testbed(tmp_path / "no" / "tb", cfg=SMALL)
    with pytest.raises(MoePruneError, match=r"holds files that moeprune did not write \(x\.txt\)"):
        build_testbed(tmp_path / "other", force=True, cfg=SMALL)  # --force never deletes someone else's files
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssertionError, match="trained"):
        build_testbed(tmp_path / "empty", force=True, cfg=SMALL)
    assert (tmp_path / "other" / "x.txt").read_text() == "mine"
    assert list((tmp_path / "empty").iterdir()) == []  # a failed rebuild leaves the folder as it was
    with pytest.raises(MoePruneError, match="another config .*'steps': \\(12, 13\\)"):
        build_testbed(small_testbed.path, cfg=dataclasses.replace(SMALL, steps=13))
    with pytest.raises(MoePruneError, match="top_k"):
        TestbedConfig(num_experts=4, top_k=4)


def test_eval_defaults_to_the_testbed_held_out_domains(small_testbed, tmp_path, monkeypatch):
    from moeprune import api

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))  # no cached default: the model's own testbed.json
    pruned = tmp_path / "pruned"
    api.prune(small_testbed.path, pruned, method="aimer", ratio=0.25, run_verify=False)
    explicit = EvalOptions(small_testbed.specs("heldout"), seq_len=SMALL.seq_len, max_sequences=8)
    for model in (small_testbed.path, pruned):  # the pruned copy points back at its testbed's data
        default = evaluate(model, EvalOptions(max_sequences=8)).to_dict()
        assert default == evaluate(model, explicit).to_dict()
        assert set(default) == {"python", "english", "arithmetic", "records"}


def test_cli_testbed_info_and_demo(small_testbed, tmp_path, capsys):
    assert main(["testbed", "info", str(small_testbed.path)]) == 0
    out = capsys.readouterr().out
    assert "JS" in out and "purity" in out and "arithmetic" in out
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--testbed", str(small_testbed.path), "--method", "frequency"]) == 0
    report = json.loads((work / "report" / "report.json").read_text())
    assert [e["verify"]["passed"] for e in report["exports"]] == [True, True]
    # the reported ratios equal an independent evaluation of the saved checkpoints
    opts = EvalOptions(max_sequences=64)
    base = evaluate(small_testbed.path, opts).scores
    for ratio in (25, 50):
        after = evaluate(work / f"frequency-{ratio}", opts).scores
        row = report["variants"][f"frequency {ratio}%"]["ratios"]
        for d in base:
            assert row[d] == pytest.approx(after[d].perplexity / base[d].perplexity, rel=1e-9)
    assert (work / "report" / "report.png").is_file() and "| frequency 50% |" in (work / "report" / "report.md"
                                                                                    ).read_text()
    # the table says which windows it used (fewer than `moeprune eval` scores), and nothing warns about --samples
    note = f"on up to 64 held-out windows of {SMALL.seq_len} tokens per domain"
    printed = capsys.readouterr()
    assert note in printed.out and note in (work / "report" / "report.md").read_text()
    assert report["eval"] == {"max_sequences": 64, "seq_len": SMALL.seq_len, "note": report["eval"]["note"]}
    assert "--samples" not in printed.err
    assert (small_testbed.path / "routing.png").is_file()
    assert not (work / "frequency-25" / "routing.png").exists() and (work / "frequency-25" / "testbed.json").is_file()


def test_quality_benchmark_rows_match_saved_checkpoints(small_testbed, tmp_path):
    """benchmarks/quality.py scores in-memory copies; each row must equal apply -> save -> eval of the same plan."""
    import importlib.util
    from pathlib import Path

    from moeprune import api

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    out = tmp_path / "q"
    assert quality.main(["--testbed", str(small_testbed.path), "--methods", "frequency", "aimer", "random",
                         "--ratios", "0.5", "--no-progressive", "--calib-samples", "16", "--eval-sequences", "8",
                         "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert {(r["method"], r["calib"]) for r in result["rows"]} >= {("frequency", "mixed"), ("frequency", "records"),
                                                                   ("aimer", "none"), ("random", "seed2")}
    row = next(r for r in result["rows"] if r["method"] == "frequency" and r["calib"] == "python")
    stats = api.calibrate(small_testbed.path, api.CalibrateOptions(small_testbed.specs("calib"), samples=16,
                                                                   seq_len=SMALL.seq_len))
    plan = api.make_plan(stats, "frequency", 0.5, calib_set=["python"])
    assert {str(k): v for k, v in plan.kept_experts.items()} == row["kept"]
    saved = api.apply_plan(small_testbed.path, plan, tmp_path / "saved").out
    after = evaluate(saved, EvalOptions(max_sequences=8)).scores
    for d, ppl in row["perplexity"].items():
        assert ppl == pytest.approx(after[d].perplexity, rel=1e-5)
    assert "Domain-specific calibration at 50%" in out.with_suffix(".md").read_text()

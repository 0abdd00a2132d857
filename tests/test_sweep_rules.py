"""The sweep's knee rule on hand-made curves (answers computed by hand), the --ratios grammar, and every refusal of
`moeprune sweep` before the model is loaded."""

from __future__ import annotations

import math
import shutil

import pytest

from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.sweep.knee import knee, parse_ratios
from moeprune.tiny import save_tiny
from textgen import write_words


def test_knee_interpolates_the_first_crossing_and_rounds_down():
    k = knee([0.1, 0.2, 0.3, 0.4], [1.0, 1.02, 1.10, 1.5], tol=0.05)
    assert k.knee == pytest.approx(0.2375, abs=1e-12)  # 0.2 + (1.05 − 1.02) / (1.10 − 1.02) · 0.1
    assert k.recommend == 0.2 and not k.holds
    # κ = 2·(slope right − slope left)/(Δr) of log q: 1.98 at 0.1, 5.57 at 0.2, 23.5 at 0.3
    assert k.elbow == 0.3


def test_knee_when_the_task_holds_everywhere_or_nowhere():
    k = knee([0.25, 0.5], [0.99, 1.05], tol=0.05)  # exactly on the line still holds
    assert k.holds and k.knee is None and k.recommend == 0.5
    k = knee([0.1, 0.2], [1.2, 1.3], tol=0.05)  # already past the line at the smallest ratio
    assert k.knee == pytest.approx(0.025, abs=1e-12) and k.recommend is None
    k = knee([0.1, 0.2, 0.3], [1.06, 1.0, 1.0], tol=0.05)  # the first crossing counts, not a later dip
    assert k.knee == pytest.approx(0.1 * 0.05 / 0.06, abs=1e-12) and k.recommend is None
    k = knee([0.2, 0.4, 0.6], [1.01, 1.03, 1.08], tol=0.1)  # non-uniform grid, larger tolerance; κ 0.24, 0.70
    assert k.knee is None and k.recommend == 0.6 and k.elbow == 0.4
    assert knee([0.5], [2.0]).elbow is None  # one swept ratio: no curvature


def test_knee_refuses_malformed_curves():
    for ratios, q in (([0.2, 0.1], [1.0, 1.1]), ([0.1], [1.0, 1.1]), ([0.1, 0.2], [1.0, math.nan])):
        with pytest.raises(MoePruneError):
            knee(ratios, q)
    with pytest.raises(MoePruneError, match="--tolerance"):
        knee([0.1], [1.0], tol=0)


def test_ratio_grammar():
    assert parse_ratios("0.1..0.9") == pytest.approx([0.1 * i for i in range(1, 10)])
    assert parse_ratios("0.1..0.9")[2] == 0.3  # rounded, not 0.30000000000000004
    assert parse_ratios("0.2..0.5", 0.15) == [0.2, 0.35, 0.5]
    assert parse_ratios("0.5, 0.25,0.5") == [0.25, 0.5]
    for text, step, match in (("0..0.5", None, "strictly between 0 and 1"), ("0.9..0.1", None, "upwards"),
                              ("0.1..0.5", 0, "--step"), ("0.5,0.25", 0.1, "--step applies to a range"),
                              ("0.5,1.5", None, "strictly between"), ("a..b", None, "LOW..HIGH"),
                              ("half", None, "comma-separated")):
        with pytest.raises(MoePruneError, match=match):
            parse_ratios(text, step)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep_refusals")
    model = save_tiny("qwen3_moe", tmp / "m", seed=1, with_tokenizer=True)
    write_words(tmp / "a.txt", n=1500, vocab=4, seed=1)
    write_words(tmp / "b.txt", n=400, vocab=10, seed=2)
    write_words(tmp / "short.txt", n=10, vocab=10, seed=4)  # ~57 tokens: fewer than the 4 windows of 16 drawn
    shutil.copy(tmp / "short.txt", tmp / "short_copy.txt")
    return tmp, model


@pytest.mark.parametrize("extra,match", [
    (["--ratios", "0..0.9"], "strictly between 0 and 1"),
    (["--ratios", "0.5", "--step", "0.1"], "--step applies to a range"),
    (["--ratios", "0.95"], "none of --ratios"),  # keeps 0 of 8 experts: fewer than top-2
    (["--criterion", "tcss"], "tcess"),  # did-you-mean
    (["--criterion", "random"], "gives every task the same plan"),
    (["--held-out", "0"], "no held-out text for \\['a'\\]"),
    (["--heldout", "c={b}"], "no --calib set of that name"),
    (["--heldout", "a={a}"], "is the task's calibration text"),
    (["--heldout", "a={b}", "--held-out", "2"], "Drop --held-out"),
    (["--tolerance", "0"], "--tolerance"),
    (["--cliff", "1.5"], "--cliff"),
    (["--probe-tokens", "-1"], "--probe-tokens"),
    (["--calib", "s={short}", "--samples", "4", "--seq-len", "16"], "kept no window apart"),
    (["--calib", "s={short}", "--heldout", "s={short_copy}", "--samples", "4", "--seq-len", "16"],
     "equal calibration windows"),
])
def test_refusals_come_before_the_model_loads(tiny, monkeypatch, capsys, extra, match):
    tmp, model = tiny

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("moeprune.sweep.run.load_model", no_load)
    paths = {k: tmp / f"{k}.txt" for k in ("a", "b", "short", "short_copy")}
    extra = [e.format(**paths) for e in extra]
    calib = [] if any(e.startswith("s=") for e in extra) else ["--calib", f"a={paths['a']}"]
    argv = ["sweep", str(model), *calib, "--samples", "4", "--seq-len", "24", "--out", str(tmp / "out"), *extra]
    assert main(argv) == 2
    assert match.replace("\\", "") in capsys.readouterr().err or pytest.fail(match)
    assert not (tmp / "out").exists()

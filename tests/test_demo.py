"""Demo details a new user sees: no warning about a `--samples` they never gave, exports that do not carry the
source model's routing plot, and a ratio chart whose every bar is labelled and readable at 25 % and at 50 %.
(The whole demo on a small testbed runs in tests/test_testbed.py.)"""

from __future__ import annotations

import logging
import math

import pytest

from moeprune import api
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions
from moeprune.demo import DemoCalibrateOptions
from moeprune.eval.perplexity import DomainScore
from moeprune.eval.table import ratio_figure
from moeprune.log import logger
from moeprune.tiny import save_tiny, tiny_tokenizer


@pytest.fixture
def warnings_logged():
    """Every record the package logger emits at WARNING or above, whatever handlers the CLI attached."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_demo_calibration_does_not_warn_about_samples_it_chose(tmp_path, warnings_logged):
    short = tmp_path / "short.txt"
    short.write_text("a few words only. " * 4)  # far fewer than 64 windows of 16 tokens
    spec = (f"short={short}",)
    sets = build_sets(DemoCalibrateOptions(spec, samples=64, seq_len=16).calib_config(), tiny_tokenizer())
    assert warnings_logged == []
    plain = build_sets(CalibrateOptions(spec, samples=64, seq_len=16).calib_config(), tiny_tokenizer())
    assert len(plain[0].input_ids) < 64
    assert [r.getMessage() for r in warnings_logged] == [  # a user's --samples still gets the warning
        f"calibration set 'short': {plain[0].stream_tokens} tokens give {len(plain[0].input_ids)} sequence(s) of 16, "
        "fewer than --samples 64"]
    assert sets[0].input_ids.tolist() == plain[0].input_ids.tolist()  # the same data either way


def test_exports_do_not_carry_the_source_routing_plot(tmp_path):
    src = save_tiny("qwen3_moe", tmp_path / "testbed-like", seed=1, with_tokenizer=True)
    (src / "routing.png").write_bytes(b"\x89PNG the source model's routing")
    (src / "testbed.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    side = {f.name for f in src.iterdir()} - {"config.json", "model.safetensors", "routing.png"}
    out = api.prune(src, tmp_path / "pruned", method="aimer", ratio=0.25, run_verify=False)[0].out
    copied = {f.name for f in out.iterdir()}
    assert "routing.png" not in copied
    assert side <= copied  # tokenizer, chat template, generation config and the testbed mark travel along
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "testbed.json"} <= side
    streamed = api.prune(src, tmp_path / "streamed", method="aimer", ratio=0.25, run_verify=False,
                         streaming=True)[0].out
    assert "routing.png" not in {f.name for f in streamed.iterdir()}


def _scores(ppl: dict[str, float]) -> dict[str, DomainScore]:
    return {d: DomainScore(p, 0.5, 100, 100 * math.log(p)) for d, p in ppl.items()}


def test_ratio_chart_labels_every_bar_and_shows_small_ratios(tmp_path):
    """The demo's numbers: 25 % bars ×1.007–×1.184 next to 50 % bars up to ×4.688, one ratio just below 1."""
    base = _scores({"python": 42.231, "english": 43.817, "arithmetic": 11.046, "records": 2.053})
    ratios = {"m 25%": {"python": 1.021, "english": 1.184, "arithmetic": 1.007, "records": 1.092},
              "m 50%": {"python": 1.808, "english": 1.436, "arithmetic": 0.995, "records": 4.688}}
    variants = {k: _scores({d: base[d].perplexity * r for d, r in row.items()}) for k, row in ratios.items()}
    fig = ratio_figure(base, variants, "t")
    ax = fig.axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(f"×{r:.3f}" for row in ratios.values() for r in row.values())
    lo, hi = (math.log(v) for v in ax.get_ylim())
    bars = [p for p in ax.patches if p.get_width() > 0]
    assert len(bars) == 8
    fractions = sorted((math.log(b.get_y() + b.get_height()) - lo) / (hi - lo) for b in bars)  # bar tops on the axis
    expected = sorted(r for row in ratios.values() for r in row.values())
    assert fractions[0] == pytest.approx(0.0)  # ×0.995: no increase, on the floor (its label still says ×0.995)
    assert all(f >= 0.1 for f in fractions[1:]), fractions  # ×1.007 is a tenth of the axis or more, not a sliver
    assert all(f <= 0.9 for f in fractions)  # the tallest bar leaves room for its label
    assert fractions == sorted(fractions) and expected == sorted(expected)  # heights keep the ratios' order
    tick_labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "×1.01" in tick_labels and "×2" in tick_labels
    import matplotlib.pyplot as plt

    plt.close(fig)

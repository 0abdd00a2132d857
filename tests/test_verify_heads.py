"""Verify's logits comparison a chunk of positions at a time (`pipeline/compare.compare_heads`), the export's side
held as hidden states plus its head (`pipeline/verify.export_logits`), and `moeprune verify --calib` (real text).

The independent references: max |Δ| and max |logit| computed by hand over the non-padding positions of the two
models' own whole-sequence logits (`model(...).logits`), and a tampered export (one expert's weights changed on
disk), which must fail on real text through the CLI (exit 1) in memory and layer by layer."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeprune
from head_spy import spy_head_logits
from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
from moeprune.calibration.engine import last_hidden
from moeprune.calibration.run import CalibrateOptions
from moeprune.cli import main
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.pipeline.compare import Logits, compare_heads
from moeprune.pipeline.verify import export_logits, logits_of, seeded_inputs, verify
from moeprune.tiny import save_tiny, tiny_model, tiny_tokenizer
from moeprune.tiny_families import tiny_family_model
from textgen import write_words


def _model(family: str, seed: int):
    return (tiny_model(family, seed=seed) if family == "qwen3_moe" else tiny_family_model(family, seed=seed)).eval()


def _by_hand(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(max |a − b|, max |a|) over the positions where mask is 1, one position at a time."""
    diff = scale = 0.0
    for i, j in mask.nonzero().tolist():
        diff = max(diff, float((a[i, j] - b[i, j]).abs().max()))
        scale = max(scale, float(a[i, j].abs().max()))
    return diff, scale


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "glm_moe_dsa", "llama4_text"])
def test_heads_in_chunks_give_the_whole_logits_figure(family, monkeypatch):
    a, b = _model(family, 2), _model(family, 3)  # two models of one shape, other weights
    x = seeded_inputs(96, batch=3, seq_len=14, seed=4)
    x["attention_mask"][2, :5] = 0  # a left-padded row (seeded_inputs pads the last row by a quarter too)
    want = _by_hand(logits_of(a, x), logits_of(b, x), x["attention_mask"])
    from moeprune.pipeline import compare as compare_module

    calls = spy_head_logits(monkeypatch, compare_module)
    sides = [Logits(m, get_adapter(m.config, model=m), last_hidden(m, get_adapter(m.config, model=m), x))
             for m in (a, b)]
    got = compare_heads(*sides, x, tol=1e-4, max_bytes=16 * 3 * 96 * 3)  # 3 positions per chunk
    assert [w for w, _ in calls] == [3, 3] * 4 + [2, 2]  # each model's head on 3 positions at a time, 14 in all
    assert not any(g for _, g in calls)  # a graph kept across chunks would hold every chunk's logits
    assert got.tokens == int(x["attention_mask"].sum())
    assert got.max_abs_diff == pytest.approx(want[0], rel=1e-5) and want[0] > 1e-3
    assert got.max_abs_logit == pytest.approx(want[1], rel=1e-5)
    assert not got.passed  # other weights: far beyond 1e-4 of the largest logit
    same = compare_heads(sides[0], Logits(whole=logits_of(a, x)), x, tol=1e-4, max_bytes=16 * 3 * 96 * 3)
    assert same.passed and same.max_abs_diff <= 1e-5 * same.max_abs_logit


def test_a_nan_fails_unless_it_is_on_padding():
    model = _model("qwen3_moe", 2)
    adapter = get_adapter(model.config, model=model)
    x = seeded_inputs(96, batch=2, seq_len=12, seed=1)  # row 1: positions 0..2 are padding
    hidden = last_hidden(model, adapter, x)
    ref = Logits(model, adapter, hidden)
    for where, fails in (((1, 1), False), ((0, 7), True)):
        bad = hidden.clone()
        bad[where] = float("nan")
        result = compare_heads(ref, Logits(model, adapter, bad), x, tol=1e-4, max_bytes=16 * 2 * 96 * 4)
        assert result.passed is not fails, (where, result.line())


def test_the_export_side_holds_the_smaller_of_logits_and_head(tmp_path):
    """Few seeded tokens: the logits; calibration windows: the last layer's outputs, the decoder layers freed, and
    the head read later gives the model's own logits."""
    path = save_tiny("qwen3_moe", tmp_path / "m", seed=1)
    few = [seeded_inputs(96, batch=2, seq_len=32, seed=0)]  # 64 x 96 logits <= embeddings + head (2 x 96 x 32)
    many = [seeded_inputs(96, batch=4, seq_len=40, seed=s) for s in (1, 2)]
    want = [logits_of(load_model(path), x) for x in many]  # a separate load: the reference forward
    held = export_logits(load_model(path), few)
    assert held[0].whole is not None and held[0].whole.shape == (2, 32, 96)
    model = load_model(path)
    held = export_logits(model, many)
    layers = get_adapter(model.config, model=model).decoder_layers(model)
    assert all(s.whole is None and s.hidden.shape == (4, 40, 32) for s in held)
    assert all(p.is_meta for p in layers.parameters()) and not model.lm_head.weight.is_meta
    for side, x, w in zip(held, many, want, strict=True):
        torch.testing.assert_close(side.at(x, torch.arange(5, 17)), w[:, 5:17], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny qwen3_moe, its honest 25 % REAP export, a copy with one expert tampered, and text to verify on."""
    root = tmp_path_factory.mktemp("verify_heads")
    write_words(root / "web.txt")
    save_tiny("qwen3_moe", root / "m", seed=3, with_tokenizer=True)
    calib = CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48)
    moeprune.prune(root / "m", root / "out", recipe=[{"method": "reap", "ratio": 0.25}], calib=calib,
                   run_verify=False)
    bad = shutil.copytree(root / "out", root / "bad")
    shard = next(iter(sorted(bad.glob("model*.safetensors"))))
    tensors = load_file(shard)
    key = next(k for k in sorted(tensors) if "layers.1." in k and "experts" in k and tensors[k].dim() >= 2)
    t = tensors[key].clone()
    t[0] = t[0] * 3 + 0.1
    tensors[key] = t
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("lazy", [False, True])
def test_verify_on_real_text_passes_an_export_and_fails_a_tampered_one(pair, lazy):
    flags = ["--calib", f"web={pair / 'web.txt'}", "--samples", "5", "--seq-len", "40", "--batch-size", "2",
             "--lazy" if lazy else "--no-lazy"]
    assert main(["verify", str(pair / "m"), str(pair / "out"), *flags]) == 0
    assert main(["verify", str(pair / "m"), str(pair / "bad"), *flags]) == 1
    sets = build_sets(CalibConfig((CalibSource("web", pair / "web.txt"),), samples=5, seq_len=40), tiny_tokenizer())
    result = verify(pair / "m", pair / "out", sets=sets, chunk=2, lazy=lazy)
    assert result.passed and result.tokens == 5 * 40


@pytest.mark.parametrize("flags,message", [
    (["--samples", "4"], "--samples shapes the real-text inputs; add --calib"),
    (["--seq-len", "64", "--batch-size", "2"], "--seq-len, --batch-size shape the real-text inputs"),
    (["--calib", "web=WEB", "--seed", "3"], "--seed seeds the random input tokens, which --calib replaces"),
])
def test_text_flags_are_refused_where_they_do_not_apply(pair, capsys, flags, message):
    flags = [f.replace("WEB", str(pair / "web.txt")) for f in flags]
    assert main(["verify", str(pair / "m"), str(pair / "out"), *flags]) == 2
    assert message in capsys.readouterr().err

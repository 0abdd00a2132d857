"""Bad input to calibrate / plan-from-stats / prune --calib / stats merge: a clear error before the model is
loaded, nothing written, nothing changed (see refusal.py and the `no_work` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeprune import api
from moeprune.calibration.run import CalibrateOptions, calibrate
from moeprune.errors import MoePruneError
from moeprune.stats.store import ExpertStats
from moeprune.tiny import save_tiny
from refusal import assert_cli_refused, assert_refused

TEXT = "the cat sat on the mat. " * 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("cal") / "m", with_tokenizer=True)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "web.txt"
    p.write_text(TEXT)
    return p


def opts(*calib: str, **kw) -> CalibrateOptions:
    return CalibrateOptions(calib, samples=2, seq_len=16, **kw)


@pytest.mark.parametrize("name, match", [
    ("stats.json", r"\.safetensors"),
    ("missing/stats.safetensors", "does not exist; create it"),
])
def test_bad_stats_output(ckpt, text, tmp_path, no_work, name, match):
    out = tmp_path / name
    assert_refused(lambda: calibrate(ckpt, opts(f"web={text}"), out), match, inputs=[ckpt, text], out=out)


def test_existing_stats_output_needs_overwrite(ckpt, text, tmp_path, no_work):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(MoePruneError, match="--overwrite"):
        calibrate(ckpt, opts(f"web={text}"), out)
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("content, suffix, calib_kw, match", [
    ("", ".txt", {}, "holds no text"),
    ("  \n\t\n", ".txt", {}, "holds no text"),
    ('{"body": "hello there"}\n', ".jsonl", {}, "no string field 'text'.*--text-field"),
    ("not json\n", ".jsonl", {}, "is not JSON"),
])
def test_bad_calibration_data(ckpt, tmp_path, no_work, content, suffix, calib_kw, match):
    data = tmp_path / f"d{suffix}"
    data.write_text(content)
    out = tmp_path / "s.safetensors"
    assert_refused(lambda: calibrate(ckpt, opts(f"d={data}", **calib_kw), out), match, inputs=[ckpt], out=out)


def test_bad_options(ckpt, text, tmp_path, no_work):
    out = tmp_path / "s.safetensors"
    for make, match in [
        (lambda: opts(f"web={text}", batch_size=0), "--batch-size"),
        (lambda: opts(f"web={text}", dtype="float13"), "float13"),
        (lambda: opts(f"web={text}", device="cuda"), "no CUDA device|"),
    ]:
        try:
            o = make()
        except MoePruneError as e:
            assert match.split("|")[0] in str(e)
            continue
        if match.endswith("|"):  # a CUDA machine accepts --device cuda; nothing to refuse there
            continue
        assert_refused(lambda o=o: calibrate(ckpt, o, out), match, inputs=[ckpt], out=out)
    assert_refused(lambda: calibrate(ckpt, opts("web"), out), "NAME=PATH", inputs=[ckpt], out=out)
    assert_refused(lambda: calibrate(ckpt, opts(f"web={tmp_path / 'nope.txt'}"), out), "does not exist",
                   inputs=[ckpt], out=out)
    assert_refused(lambda: calibrate(ckpt, opts(f"a={text}", f"a={text}"), out), "unique", inputs=[ckpt], out=out)


def test_model_without_tokenizer(text, tmp_path, no_work):
    bare = save_tiny("qwen3_moe", tmp_path / "bare")
    out = tmp_path / "s.safetensors"
    assert_refused(lambda: calibrate(bare, opts(f"web={text}"), out), "tokenizer.*--tokenizer", inputs=[bare], out=out)


def test_prune_with_calib_refuses_before_calibrating(ckpt, text, tmp_path, no_work):
    out = tmp_path / "out"
    assert_refused(lambda: api.prune(ckpt, out, method="aimer", ratio=0.25, calib=opts(f"web={text}")),
                   "ignores --calib", inputs=[ckpt, text], out=out)
    assert_refused(lambda: api.prune(ckpt, out, method="reap", ratio=0.9, calib=opts(f"web={text}")),
                   "--ratio 0.9", inputs=[ckpt, text], out=out)
    assert_refused(lambda: api.prune(ckpt, out, method="reap", ratio=0.25, calib=opts(f"web={tmp_path}/x.txt")),
                   "does not exist", inputs=[ckpt, text], out=out)


def test_binary_calibration_file_refused_before_loading(ckpt, text, tmp_path, no_work, capsys):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(256)) * 8)  # every byte value, NUL included
    out = tmp_path / "out"
    assert_refused(lambda: api.prune(ckpt, out, method="reap", ratio=0.25, calib=opts(f"web={text}", f"n={noise}")),
                   f"--calib n: {noise} is not text", inputs=[ckpt, noise], out=out)
    assert_cli_refused(["prune", ckpt, "--method", "reap", "--ratio", "0.25", "--calib", f"n={noise}", "--out", out],
                       [f"{noise} is not text"], capsys, inputs=[ckpt, noise], out=out)


@pytest.fixture(scope="module")
def stats_file(ckpt, text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "s.safetensors"
    calibrate(ckpt, opts(f"web={text}"), out)
    return out


def test_stats_misuse(ckpt, stats_file, tmp_path, capsys):
    assert_refused(lambda: api.make_plan(stats_file, "reap", 0.25, calib_set=["code"]),
                   r"\['code'\] are not in these statistics.*\['web'\]", inputs=[stats_file], out=None)
    assert_refused(lambda: api.make_plan(stats_file, "aimer", 0.25), "pass the checkpoint folder",
                   inputs=[stats_file], out=None)
    assert_refused(lambda: api.make_plan(stats_file, "reap", 0.9), "--ratio", inputs=[stats_file], out=None)
    bogus = tmp_path / "w.safetensors"
    bogus.write_bytes((ckpt / "model.safetensors").read_bytes())
    assert_refused(lambda: ExpertStats.load(bogus), "not a moeprune statistics file", inputs=[bogus], out=None)
    out = tmp_path / "m.safetensors"
    assert_cli_refused(["stats", "merge", stats_file, tmp_path / "none.safetensors", "--out", out],
                       ["does not exist"], capsys, inputs=[stats_file], out=out)
    assert_cli_refused(["calibrate", ckpt, "--out", out], ["--calib NAME=PATH"], capsys, inputs=[ckpt], out=out)


def test_merging_stats_of_another_model_is_refused(ckpt, stats_file, text, tmp_path):
    other = save_tiny("qwen3_moe", tmp_path / "other", seed=5, with_tokenizer=True)
    theirs = calibrate(other, opts(f"web={text}"))
    with pytest.raises(MoePruneError, match="router_sha256"):
        ExpertStats.load(stats_file).merge(theirs)

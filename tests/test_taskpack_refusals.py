"""Task-pack refusals, each before any weight is read (the loaders are made to fail loudly) and with nothing left
behind: a pack whose checkpoint changed (config.json or a shard header: sha256 mismatch), an unknown task, a ratio
the pack lacks, bad --ratios / --criterion / --key-layers, --task without --pack, a pack for another MODEL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moeprune import load_for_task
from moeprune.calibration.run import CalibrateOptions
from moeprune.taskpack import load as load_mod
from moeprune.taskpack import retrieve as retrieve_mod
from moeprune.taskpack.build import BuildOptions, build_pack
from moeprune.taskpack.pack import RatioNotInPackError, StalePackError, UnknownTaskError
from moeprune.tiny import save_tiny
from refusal import assert_cli_refused, assert_refused
from textgen import write_words


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("taskpack_refusals")
    model = save_tiny("qwen3_moe", root / "model", seed=1, with_tokenizer=True)
    a, b = write_words(root / "a.txt", vocab=3, seed=1), write_words(root / "b.txt", vocab=12, seed=2)
    calib = CalibrateOptions((f"a={a}", f"b={b}"), samples=4, seq_len=32, held_out=0)
    build_pack(model, calib, BuildOptions((0.5,)), root / "pack")
    return root, model, a, b


@pytest.fixture
def no_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(load_mod, "load_pruned", fail)
    monkeypatch.setattr(retrieve_mod, "load_lazy", fail)


def test_unknown_task_and_missing_ratio(setup, no_load):
    root, model, _, _ = setup
    err = assert_refused(lambda: load_for_task(root / "pack", task="nope", ratio=0.5), r"task 'nope' is not in this "
                         r"pack; it holds a, b", inputs=[model, root / "pack"], out=None)
    assert isinstance(err, UnknownTaskError)
    err = assert_refused(lambda: load_for_task(root / "pack", task="a", ratio=0.25), r"ratio 0.25 is not in this "
                         r"pack \(it holds \[0.5\]", inputs=[model, root / "pack"], out=None)
    assert isinstance(err, RatioNotInPackError)
    assert_refused(lambda: load_for_task(root / "pack", ratio=0.5), "needs a prompt", inputs=[model], out=None)
    assert_refused(lambda: load_for_task(root / "pack", prompt="x", margin=-1), "margin must be >= 0",
                   inputs=[model], out=None)
    assert_refused(lambda: load_for_task(root / "nothing", task="a"), "is not a task pack", inputs=[model], out=None)


@pytest.mark.parametrize("change", ["config", "header"])
def test_a_changed_checkpoint_is_refused(setup, tmp_path, change, no_load):
    root, model, a, b = setup
    copy = shutil.copytree(model, tmp_path / "model")
    pack = tmp_path / "pack"
    shutil.copytree(root / "pack", pack)
    raw = json.loads((pack / "taskpack.json").read_text())
    raw["checkpoint"] = str(copy.resolve())
    (pack / "taskpack.json").write_text(json.dumps(raw))
    if change == "config":
        cfg = json.loads((copy / "config.json").read_text())
        cfg["rope_theta"] = 12345.0
        (copy / "config.json").write_text(json.dumps(cfg))
        what = "config.json"
    else:  # same length header, one tensor renamed: the weights' bytes are untouched
        blob = (copy / "model.safetensors").read_bytes()
        blob = blob.replace(b"model.norm.weight", b"model.norm.weighu", 1)
        (copy / "model.safetensors").write_bytes(blob)
        what = "model.safetensors"
    err = assert_refused(lambda: load_for_task(pack, task="a", ratio=0.5), rf"changed since the task pack was built "
                         rf"\({what} differ\).*Rebuild the pack", inputs=[copy, pack], out=None)
    assert isinstance(err, StalePackError)


def test_bad_build_flags(setup, capsys, no_load):
    root, model, a, b = setup
    out = root / "new-pack"
    base = ["taskpack", "build", model, "--calib", f"a={a}", "--calib", f"b={b}", "--out", out]
    (root / "bad.json").write_text('{"a": 0.5, "c": 0.75}')
    (root / "notdict.json").write_text("[0.5]")
    for ratios, pattern in (("0.5,1.5", r"strictly between 0 and 1"), ("abc", r"comma-separated fractions"),
                            ("", "no --ratios given"), (str(root / "bad.json"), r"recommends ratios for \['c'\]"),
                            (str(root / "notdict.json"), "not a {task: ratio} JSON object"),
                            (str(root / "missing.json"), "no such file")):
        assert_cli_refused([*base, "--ratios", ratios], [pattern], capsys, inputs=[model], out=out)
    assert_cli_refused([*base, "--ratios", "0.5", "--criterion", "aimer"], ["weights-based", "calibrated "
                       "criterion"], capsys, inputs=[model], out=out)
    assert_cli_refused([*base, "--ratios", "0.5", "--criterion", "tcesz"], ["tcess"], capsys, inputs=[model],
                       out=out)
    assert_cli_refused([*base, "--ratios", "0.5", "--key-layers", "9"], ["has 2 MoE layers"], capsys,
                       inputs=[model], out=out)
    assert_cli_refused(["taskpack", "build", model, "--calib", f"a={a}", "--ratios", "0.5", "--out", out],
                       ["at least two tasks"], capsys, inputs=[model], out=out)


def test_eval_flags(setup, capsys, no_load, tmp_path):
    root, model, a, b = setup
    assert_cli_refused(["eval", model, "--data", f"a={a}", "--task", "a"], ["add --pack PACK"], capsys,
                       inputs=[model], out=None)
    assert_cli_refused(["eval", model, "--data", f"a={a}", "--pack", root / "pack", "--task", "zzz"],
                       ["task 'zzz' is not in this pack"], capsys, inputs=[model], out=None)
    assert_cli_refused(["eval", model, "--data", f"a={a}", "--pack", root / "pack", "--task-ratio", "0.75"],
                       [r"ratio 0.75 is not in this pack"], capsys, inputs=[model], out=None)
    assert_cli_refused(["eval", model, "--data", f"a={a}", "--pack", root / "pack", "--prompt", "hi"],
                       ["name the task"], capsys, inputs=[model], out=None)
    other = save_tiny("qwen3_moe", tmp_path / "other", seed=1, with_tokenizer=True)
    assert_cli_refused(["eval", other, "--data", f"a={a}", "--pack", root / "pack", "--task", "a"],
                       ["was built from", "pass that checkpoint"], capsys, inputs=[model], out=None)
    out = tmp_path / "cmp"
    assert_cli_refused(["compare", model, model, "--data", f"a={a}", "--pack", root / "pack", "--task", "zzz",
                        "--out", out], ["task 'zzz' is not in this pack"], capsys, inputs=[model], out=out)


def test_export_refusals(setup, capsys, tmp_path):
    root, model, _, _ = setup
    out = tmp_path / "exp"
    assert_cli_refused(["taskpack", "export", root / "pack", "--task", "c", "--ratio", "0.5", "--out", out],
                       ["task 'c' is not in this pack"], capsys, inputs=[model], out=out)
    assert_cli_refused(["taskpack", "export", root / "pack", "--task", "a", "--ratio", "0.3", "--out", out],
                       ["ratio 0.3 is not in this pack"], capsys, inputs=[model], out=out)
    assert_cli_refused(["taskpack", "export", root / "pack", "--task", "a", "--ratio", "0.5", "--out",
                        root / "pack" / "x"], ["inside"], capsys, inputs=[model], out=None)


def test_an_intact_copy_is_accepted(setup, tmp_path):
    """The refusal above is about the change, not the copy: the same pack on an unchanged copy loads."""
    root, model, _, _ = setup
    copy = shutil.copytree(model, tmp_path / "model")
    pack = shutil.copytree(root / "pack", tmp_path / "pack")
    raw = json.loads((Path(pack) / "taskpack.json").read_text())
    raw["checkpoint"] = str(Path(copy).resolve())
    (Path(pack) / "taskpack.json").write_text(json.dumps(raw))
    assert load_for_task(pack, task="a", ratio=0.5).task == "a"


def test_sweep_ratios_json_sets_each_tasks_default_ratio(setup, tmp_path, capsys):
    """`moeprune sweep`'s ratios.json: every task gets both ratios, and its own is the default of load_for_task."""
    from moeprune.cli import main

    root, model, a, b = setup
    (tmp_path / "ratios.json").write_text(json.dumps({"a": 0.5, "b": 0.75}))
    pack = tmp_path / "pack"
    assert main(["taskpack", "build", str(model), "--calib", f"a={a}", "--calib", f"b={b}", "--ratios",
                 str(tmp_path / "ratios.json"), "--samples", "4", "--seq-len", "32", "--out", str(pack)]) == 0
    raw = json.loads((pack / "taskpack.json").read_text())
    assert raw["ratios"] == [0.5, 0.75]
    assert {n: t["recommended"] for n, t in raw["tasks"].items()} == {"a": 0.5, "b": 0.75}
    E = raw["num_experts"]
    for task, kept in (("a", E // 2), ("b", E // 4)):
        loaded = load_for_task(pack, task=task)
        assert {len(v) for v in loaded.kept.values()} == {kept} and loaded.ratio == raw["tasks"][task]["recommended"]
    assert {len(v) for v in load_for_task(pack, task="b", ratio=0.5).kept.values()} == {E // 2}


def test_a_pack_moved_with_its_checkpoint_finds_it_there(setup, tmp_path, no_load):
    """The pack records its checkpoint relative to itself as well: moved together they still match; a pack moved
    alone uses the absolute path; neither there is refused naming both places."""
    from moeprune.taskpack.pack import TaskPack

    root, model, _, _ = setup
    together = tmp_path / "together"
    shutil.copytree(model, together / "model")
    shutil.copytree(root / "pack", together / "pack")
    raw = json.loads((together / "pack" / "taskpack.json").read_text())
    assert raw["checkpoint_relative"] == "../model" and "folder" not in raw
    assert TaskPack.load(together / "pack").open_checkpoint().path == (together / "model").resolve()
    alone = shutil.copytree(root / "pack", tmp_path / "a" / "b" / "pack")
    assert TaskPack.load(alone).open_checkpoint().path == Path(model).resolve()
    raw["checkpoint"] = str(tmp_path / "gone")
    (alone / "taskpack.json").write_text(json.dumps(raw))
    err = assert_refused(lambda: load_for_task(alone, task="a", ratio=0.5), r"checkpoint is not at .*gone nor at "
                         r".*model \(relative to the pack\)", inputs=[alone], out=None)
    assert isinstance(err, StalePackError)

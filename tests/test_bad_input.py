"""Bad inputs: each one is refused with a MoePruneError (CLI: exit 2, message on stderr, no traceback) whose
message says what to change; it is raised before any expensive work (reading expert weights, loading the model,
creating the output), nothing is left behind (no --out folder, no `.out.tmp-*` / `.out.old-*` siblings) and the
input checkpoint is byte-for-byte unchanged."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from moeprune import api
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.models import supported_families
from moeprune.select.plan import PrunePlan
from moeprune.tiny import save_tiny
from refusal import assert_cli_refused, assert_refused, leftovers, snapshot  # noqa: F401

# ----------------------------------------------------------------------------------------------- not MoE / unknown


NOT_MOE = r"model_type 'qwen3' is not a Mixture-of-Experts model"


def test_dense_model_is_not_moe(dense, tmp_path, no_work, capsys):
    out = tmp_path / "out"
    err = assert_refused(lambda: api.prune(dense, out, method="aimer", ratio=0.25), NOT_MOE, inputs=[dense], out=out)
    assert "nothing to do for a dense model" in str(err)
    assert_refused(lambda: api.info(dense), NOT_MOE, inputs=[dense], out=None)
    assert_refused(lambda: api.make_plan(dense, "aimer", 0.25), NOT_MOE, inputs=[dense], out=None)
    assert_cli_refused(["info", dense], [NOT_MOE], capsys, inputs=[dense], out=None)
    assert_cli_refused(
        ["prune", dense, "--method", "aimer", "--ratio", "0.25", "--out", out],
        [NOT_MOE],
        capsys,
        inputs=[dense],
        out=out,
    )


def test_unknown_moe_architecture(unknown_moe, tmp_path, no_work, capsys):
    out = tmp_path / "out"
    match = r"unknown MoE architecture 'llama'"
    err = assert_refused(lambda: api.prune(unknown_moe, out, method="aimer", ratio=0.25), match,
                         inputs=[unknown_moe], out=out)
    msg = str(err)
    families = supported_families()
    assert len(families) >= 8
    for family in families:
        assert family in msg, f"supported family {family} not named in: {msg}"
    assert "docs/adding-a-model.md" in msg
    assert "adapter" in msg
    assert_refused(lambda: api.info(unknown_moe), match, inputs=[unknown_moe], out=None)
    assert_cli_refused(
        ["plan", unknown_moe, "--method", "aimer", "--ratio", "0.25"],
        [match, r"Supported families: .*qwen3_moe", r"docs/adding-a-model\.md"],
        capsys,
        inputs=[unknown_moe],
        out=None,
    )


# ----------------------------------------------------------------------------------------------- output folder


K6 = [0, 1, 2, 3, 4, 5]


def _good_plan(model: Path) -> PrunePlan:
    return PrunePlan({1: K6, 2: K6}, 8, model_type="qwen3_moe")


RUNNERS = {
    "prune": lambda model, out, overwrite: api.prune(model, out, method="aimer", ratio=0.25, overwrite=overwrite),
    "apply": lambda model, out, overwrite: api.apply_plan(model, _good_plan(model), out, overwrite=overwrite),
    "apply_streaming": lambda model, out, overwrite: api.apply_plan(
        model, _good_plan(model), out, streaming=True, overwrite=overwrite
    ),
}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_output_exists_refused(runner, qwen, tmp_path, no_work, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(
        lambda: RUNNERS[runner](qwen, out, False),
        r"output .*out already exists; pass --overwrite to replace it or choose another --out",
        inputs=[qwen, out],
        out=out,
    )
    assert_cli_refused(
        ["prune", qwen, "--method", "aimer", "--ratio", "0.25", "--out", out],
        [r"already exists; pass --overwrite"],
        capsys,
        inputs=[qwen, out],
        out=out,
    )
    assert (out / "keep.txt").read_text() == "mine"


def test_output_is_a_file_refused(qwen, tmp_path, no_work):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert_refused(
        lambda: api.prune(qwen, out, method="aimer", ratio=0.25, overwrite=True),
        r"output .*out exists and is not a folder",
        inputs=[qwen, tmp_path],
        out=out,
    )


def test_output_parent_missing(qwen, tmp_path, no_work):
    out = tmp_path / "missing" / "out"
    assert_refused(
        lambda: api.prune(qwen, out, method="aimer", ratio=0.25),
        r"the parent folder of .*missing/out does not exist; create it first",
        inputs=[qwen],
        out=out,
    )
    assert not out.parent.exists()


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_overwrite_replaces_and_works(runner, qwen, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # a previous run's output: its report marks it as moeprune's (other folders are refused)
    (out / "moeprune_report.json").write_text("{}")
    (out / "stale.txt").write_text("old run")
    before = snapshot(qwen)
    RUNNERS[runner](qwen, out, True)
    assert snapshot(qwen) == before
    assert not (out / "stale.txt").exists()
    assert leftovers(out) == []
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 6 or cfg.get("num_experts") == 6
    report = json.loads((out / "moeprune_report.json").read_text())
    assert report["num_experts_after"] == 6
    if runner == "prune":
        assert report["verify"]["passed"] is True
    assert len(Checkpoint.open(out).entries) == len(Checkpoint.open(qwen).entries) - 2 * 2 * 3


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["same", "inside", "inside_deep", "parent", "symlink"])
def test_output_overlapping_input_refused(where, overwrite, qwen, copy_of, tmp_path, no_work, capsys):
    model = copy_of(qwen)
    out = {
        "same": model,
        "inside": model / "pruned",
        "inside_deep": model / "a" / "pruned",
        "parent": model.parent,
        "symlink": tmp_path / "link",
    }[where]
    if where == "symlink":
        out.symlink_to(model, target_is_directory=True)
    if where == "inside_deep":
        (model / "a").mkdir()
    match = (
        r"contains the input checkpoint .*; choose another --out folder"
        if where == "parent"
        else r"is the input checkpoint or inside it; moeprune never writes there\. Choose another --out folder"
    )
    for runner in RUNNERS.values():
        assert_refused(lambda run=runner: run(model, out, overwrite), match, inputs=[model], out=out)
    argv = ["prune", model, "--method", "aimer", "--ratio", "0.25", "--out", out] + (["--overwrite"] * overwrite)
    assert_cli_refused(argv, [match], capsys, inputs=[model], out=out)
    assert leftovers(model) == [] and not list(model.parent.glob(".*tmp-*"))


def test_failure_midway_leaves_nothing(qwen, tmp_path, monkeypatch):
    """An error during the work itself (after the output checks) removes the temporary folder."""

    def boom(*args, **kwargs):
        raise MoePruneError("simulated failure during surgery")

    from moeprune.surgery import in_memory

    monkeypatch.setattr(in_memory, "prune_layer", boom)
    out = tmp_path / "out"
    assert_refused(
        lambda: api.prune(qwen, out, method="aimer", ratio=0.25), "simulated failure", inputs=[qwen], out=out
    )
    # with --overwrite, the existing folder survives a failed run untouched
    out.mkdir()
    (out / "moeprune_report.json").write_text("{}")  # marks it as a previous moeprune output
    (out / "previous.txt").write_text("previous result")
    assert_refused(
        lambda: api.prune(qwen, out, method="aimer", ratio=0.25, overwrite=True),
        "simulated failure",
        inputs=[qwen, out],
        out=out,
    )
    assert (out / "previous.txt").read_text() == "previous result"


# ----------------------------------------------------------------------------------------------- broken weights


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


CORRUPTIONS = {
    "truncated_1_byte": (
        lambda f: _truncate(f, 1),
        r"is truncated: tensor .* ends at byte \d+ but the file has \d+ "
        r"bytes\. Re-download or re-save",
    ),
    "truncated_1000_bytes": (lambda f: _truncate(f, 1000), r"is truncated: tensor"),
    "truncated_into_header": (lambda f: f.write_bytes(f.read_bytes()[:100]), r"corrupt safetensors header \(length"),
    "truncated_to_4_bytes": (lambda f: f.write_bytes(f.read_bytes()[:4]), r"not a safetensors file \(only 4 bytes\)"),
    "garbage_header_length": (
        lambda f: f.write_bytes(b"\xde\xad\xbe\xef\xde\xad\xbe\xef" + f.read_bytes()[8:]),
        r"corrupt safetensors header \(length \d+, file \d+ bytes\)",
    ),
    "header_length_cuts_json": (
        lambda f: f.write_bytes(struct.pack("<Q", 16) + f.read_bytes()[8:]),
        r"corrupt safetensors header \(",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_broken_safetensors(case, qwen, copy_of, tmp_path, no_work, capsys):
    model = copy_of(qwen)
    shard = model / "model.safetensors"
    corrupt, match = CORRUPTIONS[case]
    corrupt(shard)
    named = re.escape(str(shard))  # the message names the broken file
    out = tmp_path / "out"
    assert_refused(lambda: Checkpoint.open(model), named + ".*" + match, inputs=[model], out=None)
    assert_refused(lambda: api.prune(model, out, method="aimer", ratio=0.25), named, inputs=[model], out=out)
    assert_refused(lambda: api.info(model), named, inputs=[model], out=None)
    assert_cli_refused(
        ["prune", model, "--method", "aimer", "--ratio", "0.25", "--out", out, "--streaming"],
        [named, match],
        capsys,
        inputs=[model],
        out=out,
    )


def test_sharded_checkpoint_missing_shard(tmp_path, no_work):
    model = save_tiny("qwen3_moe", tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    out = tmp_path / "out"
    assert_refused(
        lambda: api.prune(model, out, method="aimer", ratio=0.25),
        rf"model\.safetensors\.index\.json names shards that are missing: {re.escape(shards[-1].name)}",
        inputs=[model],
        out=out,
    )


# ----------------------------------------------------------------------------------------------- paths, methods


def test_model_path_does_not_exist(tmp_path, no_work, capsys):
    missing, out = tmp_path / "no_such_model", tmp_path / "out"
    match = (
        r"no_such_model does not exist\. moeprune works on local checkpoint folders .*pass the folder that "
        r"holds config\.json"
    )
    assert_refused(lambda: api.prune(missing, out, method="aimer", ratio=0.25), match, inputs=[], out=out)
    assert_refused(lambda: api.info(missing), match, inputs=[], out=None)
    assert_cli_refused(["info", missing], [match], capsys, inputs=[], out=None)
    assert not missing.exists()


def test_folder_without_config(qwen, copy_of, tmp_path, no_work, capsys):
    model = copy_of(qwen)
    (model / "config.json").unlink()
    out = tmp_path / "out"
    match = r"has no config\.json: it is not a Hugging Face checkpoint folder"
    assert_refused(lambda: api.prune(model, out, method="aimer", ratio=0.25), match, inputs=[model], out=out)
    assert_cli_refused(
        ["plan", model, "--method", "aimer", "--ratio", "0.25"], [match], capsys, inputs=[model], out=None
    )


def test_model_path_is_a_file(qwen, tmp_path, no_work):
    out = tmp_path / "out"
    f = qwen / "config.json"
    assert_refused(
        lambda: api.prune(f, out, method="aimer", ratio=0.25),
        r"config\.json is a file; pass the checkpoint folder",
        inputs=[qwen],
        out=out,
    )


@pytest.mark.parametrize("variant", ["no_weights", "only_bin", "config_not_json"])
def test_folder_with_bad_contents(variant, qwen, copy_of, tmp_path, no_work):
    model = copy_of(qwen)
    if variant == "config_not_json":
        (model / "config.json").write_text("{not json")
        match = r"config\.json is not valid JSON"
    else:
        (model / "model.safetensors").unlink()
        match = r"has no \*\.safetensors weights"
        if variant == "only_bin":
            (model / "pytorch_model.bin").write_bytes(b"\0" * 16)
            match += r" \(only PyTorch \.bin files: re-save them with save_pretrained"
    out = tmp_path / "out"
    assert_refused(lambda: api.prune(model, out, method="aimer", ratio=0.25), match, inputs=[model], out=out)


def test_unknown_method(qwen, tmp_path, no_work, capsys):
    out = tmp_path / "out"
    from moeprune.criteria import CRITERIA

    every = ", ".join(sorted([*CRITERIA, "naee", "auto", "stun"]))  # every stage's methods are listed, by stage
    match = (r"unknown method 'aimr'\. Did you mean 'aimer'\? Choose one of: compress: compress; distill: distill; "
             r"experts: " + re.escape(every) + r"; merge: dern, hcsmoe, msmoe, submoe; neurons: camera, heapr; "
             r"quantize: quantize; repair: repair; routing: naee_skip, otp, top_p, topk; sparsity: wanda\.")
    assert_refused(lambda: api.prune(qwen, out, method="aimr", ratio=0.25), match, inputs=[qwen], out=out)
    assert_refused(lambda: api.make_plan(qwen, "aimr", 0.25), match, inputs=[qwen], out=None)
    assert_cli_refused(
        ["prune", qwen, "--method", "aimr", "--ratio", "0.25", "--out", out], [match], capsys, inputs=[qwen], out=out
    )
    assert_cli_refused(
        ["plan", qwen, "--method", "weight-norm", "--ratio", "0.25"],
        [r"unknown method 'weight-norm'\. Did you mean 'weight_norm'\?"],
        capsys,
        inputs=[qwen],
        out=None,
    )
    # did-you-mean knows every stage's methods, not only the expert criteria
    for typo, meant in (("hepr", "heapr"), ("msmo", "msmoe"), ("dernn", "dern")):
        assert_refused(lambda t=typo: api.prune(qwen, out, method=t, ratio=0.25), f"Did you mean '{meant}'",
                       inputs=[qwen], out=out)
    # no close match: still lists the choices
    assert_refused(
        lambda: api.make_plan(qwen, "xyzzy", 0.25),
        r"unknown method 'xyzzy'\. Choose one of: compress: compress; distill: distill; experts: aimer",
        inputs=[qwen],
        out=None,
    )


# ------------------------------------------------------------------------------------ sizes, dtypes, plan path


def test_malformed_shard_size(qwen, tmp_path, no_work):
    out = tmp_path / "out"
    assert_refused(
        lambda: api.apply_plan(qwen, _good_plan(qwen), out, max_shard_size="5XB"),
        r"cannot read size '5XB'; write it like 5GB",
        inputs=[qwen],
        out=out,
    )


def test_bad_shard_size_refused_before_scoring(qwen, tmp_path, no_work):
    out = tmp_path / "out"
    assert_refused(
        lambda: api.prune(qwen, out, method="aimer", ratio=0.25, max_shard_size="0GB"),
        r"--max-shard-size must be positive",
        inputs=[qwen],
        out=out,
    )


def test_bad_verify_dtype_leaves_nothing(qwen, tmp_path):
    out = tmp_path / "out"
    assert_refused(
        lambda: api.prune(qwen, out, method="random", ratio=0.25, verify_dtype="float64"),
        r"unknown dtype 'float64'; choose one of",
        inputs=[qwen],
        out=out,
    )


def test_plan_out_in_missing_folder(qwen, tmp_path, capsys):
    plan_out = tmp_path / "missing" / "plan.json"
    assert_cli_refused(
        ["plan", qwen, "--method", "aimer", "--ratio", "0.25", "--out", plan_out],
        [r"missing"],
        capsys,
        inputs=[qwen],
        out=None,
    )
    assert not plan_out.parent.exists()


def test_calibrated_method_without_calibration(qwen, tmp_path, no_work):
    """Calibrated criteria: prune asks for --calib, plan from a checkpoint asks for a statistics file."""
    out = tmp_path / "out"
    assert_refused(lambda: api.prune(qwen, out, method="reap", ratio=0.25), "needs calibration data: pass --calib",
                   inputs=[qwen], out=out)
    assert_refused(lambda: api.make_plan(qwen, "reap", 0.25), "needs calibration statistics", inputs=[qwen],
                   out=None)

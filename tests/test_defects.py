"""Defects found in review of the old three-pipeline code, one test each: they must stay fixed in the one pipeline.

Every run is on a tiny qwen3_moe with local calibration text; nothing is downloaded and everything is written
under pytest's tmp folders. Shard sizes are read with os.stat and the safetensors header length (8 bytes + N), not
with moeprune's own readers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from moeprune.cli import main
from moeprune.log import logger
from moeprune.tiny import save_tiny
from refusal import assert_cli_refused, snapshot

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
CALIB = ["--samples", "6", "--seq-len", "48"]
BF16_TOL = 3e-2  # the bfloat16 tolerance, written here independently of pipeline.verify.DEFAULT_TOL
SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
VERIFY_LINE = "max abs logit difference"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    g = torch.Generator().manual_seed(0)
    (root / "web.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 10, (2500,), generator=g)))
    save_tiny("qwen3_moe", root / "qwen3_moe", seed=2, with_tokenizer=True)
    return root


def _src(base):
    return base / "qwen3_moe"


def _calib(base) -> list[str]:
    return ["--calib", f"web={base / 'web.txt'}", *CALIB]


# one method of each stage kind; the merge and neuron ones calibrate
KINDS = {
    "experts": ["--method", "reap", "--ratio", "0.25"],
    "merge": ["--method", "msmoe", "--ratio", "0.25"],
    "neurons": ["--method", "heapr", "--ratio", "0.5"],
}


@pytest.fixture(scope="module")
def bf16_exports(base):
    """One export per stage kind, pruned with --verify-dtype bfloat16 and the default --max-shard-size.

    Verification may fail in bfloat16 (exit 1): two router logits that tie in bfloat16 can be ordered differently
    by top-k over the masked original's 8 columns and the export's 6; the export is written either way."""
    out = {}
    for kind, argv in KINDS.items():
        out[kind] = base / f"bf16-{kind}"
        rc = main(["prune", str(_src(base)), *argv, *_calib(base), "--verify-dtype", "bfloat16",
                   "--out", str(out[kind])])
        assert rc == (0 if _report(out[kind])["verify"]["passed"] else 1)
    return out


def _report(folder) -> dict:
    return json.loads((folder / "moeprune_report.json").read_text())


def _tensor_bytes(file) -> int:
    """Bytes of tensor data in one safetensors file: its size (os.stat) less the 8-byte length and the header."""
    with open(file, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.stat(file).st_size - 8 - header


@pytest.fixture
def keep_log_level():
    level = logger.level
    yield
    logger.setLevel(level)  # setLevel, not an attribute write: it also clears the logger's isEnabledFor cache


@pytest.fixture
def fresh_log_handler(monkeypatch, keep_log_level):
    """The CLI attaches its stderr handler to the package logger once per process; a handler left by an earlier
    test writes to that test's (closed) capture. Start without one, so main() attaches it to this test's stderr."""
    monkeypatch.setattr(logger, "handlers", [])


# ------------------------------------------------------------------------------- 1. --max-shard-size everywhere
@pytest.mark.parametrize("kind", ["merge", "neurons"])
def test_max_shard_size_applies_to_merges_and_neuron_methods(base, tmp_path, kind):
    out, limit = tmp_path / "out", 20_000  # "20KB": transformers' and moeprune's KB is 10^3 bytes
    assert main(["prune", str(_src(base)), *KINDS[kind], *_calib(base), "--max-shard-size", "20KB",
                 "--out", str(out)]) == 0
    shards = sorted(f for f in out.iterdir() if SHARD.fullmatch(f.name))
    assert len(shards) > 1, sorted(f.name for f in out.iterdir())
    totals = {SHARD.fullmatch(f.name).group(2) for f in shards}
    assert totals == {f"{len(shards):05d}"}  # model-0000x-of-0000y with y = the number of files
    assert [int(SHARD.fullmatch(f.name).group(1)) for f in shards] == list(range(1, len(shards) + 1))
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    for f in shards:
        assert 0 < _tensor_bytes(f) <= limit, (f.name, os.stat(f).st_size)
    report = _report(out)
    assert report["verify"]["passed"] and report["stages"][0]["stage"] == kind


@pytest.mark.parametrize("kind", list(KINDS))
def test_default_max_shard_size_writes_one_file(bf16_exports, kind):
    out = bf16_exports[kind]
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert not [f.name for f in out.iterdir() if SHARD.fullmatch(f.name)]


# ------------------------------------------------------------------------------- 2. --verify-dtype everywhere
def test_verify_dtype_reaches_every_stage_kind(bf16_exports):
    from moeprune.pipeline.verify import DEFAULT_TOL

    assert DEFAULT_TOL["bfloat16"] == BF16_TOL
    tolerances = {kind: _report(out)["verify"]["tolerance"] for kind, out in bf16_exports.items()}
    assert tolerances == {kind: BF16_TOL for kind in KINDS}, tolerances
    assert [_report(out)["stages"][0]["stage"] for out in bf16_exports.values()] == list(KINDS)


# ------------------------------------------------------------------------------- 3. verify of neuron exports
def _tamper(folder) -> None:
    """Shift every routed-expert tensor of the first MoE layer (layer 1) by 0.5."""
    changed = 0
    for shard in sorted(folder.glob("model*.safetensors")):
        tensors = load_file(shard)
        keys = [k for k in tensors if ".layers.1.mlp.experts." in k]
        for k in keys:
            tensors[k] = tensors[k] + 0.5
        if keys:
            save_file(tensors, str(shard), metadata={"format": "pt"})
            changed += len(keys)
    assert changed


def test_verify_cli_checks_neuron_and_chained_exports(base, bf16_exports, tmp_path):
    src = _src(base)
    chained = tmp_path / "chained"
    assert main(["prune", str(src), *KINDS["neurons"], "--expert-method", "frequency", "--expert-ratio", "0.25",
                 *_calib(base), "--no-verify", "--out", str(chained)]) == 0
    assert [s["stage"] for s in _report(chained)["stages"]] == ["experts", "neurons"]
    assert "verify" not in _report(chained)
    for export in (bf16_exports["neurons"], chained):
        assert main(["verify", str(src), str(export)]) == 0
        tampered = shutil.copytree(export, tmp_path / f"tampered-{export.name}")
        _tamper(tampered)
        assert main(["verify", str(src), str(tampered)]) == 1


# ------------------------------------------------------------------------------- 4. inapplicable options refused
EXPERT, NEURON, MERGE = ["--method", "aimer", "--ratio", "0.25"], KINDS["neurons"], KINDS["merge"]
INAPPLICABLE = [
    (EXPERT, ["--budget", "layer"], "--budget"),
    *[(base_argv, flag, flag[0]) for base_argv in (NEURON, KINDS["experts"], EXPERT)
      for flag in (["--merge", "svd"], ["--router", "weighted"], ["--rank", "2"], ["--threshold", "0.5"])],
    (NEURON, ["--rho", "0.5"], "--rho"),
    (EXPERT, ["--rho", "0.5"], "--rho"),
    (KINDS["experts"], ["--rho", "0.5"], "--rho"),
    *[(base_argv, ["--seed", seed], "--seed") for base_argv in (MERGE, NEURON, EXPERT) for seed in ("1", "0")],
    (MERGE, ["--rank", "2"], "--rank"),  # msmoe merges with average
    (["--method", "dern", "--ratio", "0.25"], ["--rank", "2"], "--rank"),
    (MERGE, ["--threshold", "0.5"], "--threshold"),
    (["--method", "submoe", "--ratio", "0.25"], ["--threshold", "0.5"], "--threshold"),
    (EXPERT, ["--floor", "2"], "--floor"),
    (EXPERT, ["--floor", "2", "--policy", "per_group"], "--floor"),
]


@pytest.mark.parametrize("method_argv, extra, flag", INAPPLICABLE,
                         ids=[f"{m[1]}{''.join(e)}" for m, e, _ in INAPPLICABLE])
def test_inapplicable_options_refused_before_work(base, tmp_path, no_work, capsys, method_argv, extra, flag):
    out = tmp_path / "out"
    calib = [] if method_argv[1] == "aimer" else _calib(base)
    assert_cli_refused(["prune", _src(base), *method_argv, *extra, *calib, "--out", out], [re.escape(flag)],
                       capsys, inputs=[_src(base)], out=out)


# ------------------------------------------------------------------------------- 5. did-you-mean, every stage
TYPOS = {"msmo": "msmoe", "hcsmo": "hcsmoe", "submo": "submoe", "der": "dern", "heap": "heapr", "camer": "camera",
         "reep": "reap"}
EVERY = r"merge: dern, hcsmoe, msmoe, submoe; neurons: camera, heapr"


@pytest.mark.parametrize("typo", list(TYPOS))
def test_did_you_mean_knows_every_stage(base, tmp_path, no_work, capsys, typo):
    src, out = _src(base), tmp_path / "out"
    want = [rf"unknown method '{typo}'\. Did you mean '{TYPOS[typo]}'\?", EVERY]
    assert_cli_refused(["prune", src, "--method", typo, "--ratio", "0.25", "--out", out], want, capsys,
                       inputs=[src], out=out)
    assert_cli_refused(["plan", src, "--method", typo, "--ratio", "0.25"], want, capsys, inputs=[src], out=None)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"stages:\n  - {{method: reap, ratio: 0.25}}\n  - {{method: {typo}, ratio: 0.25}}\n")
    assert_cli_refused(["prune", src, "--recipe", recipe, *_calib(base), "--out", out],
                       [r"recipe\.yaml: stage 2: " + want[0], EVERY], capsys, inputs=[src], out=out)


# ------------------------------------------------------------------------------- 6. --as-you-go, data-free
@pytest.mark.parametrize("method", ["aimer", "random", "weight_norm"])
def test_as_you_go_with_data_free_criterion_refused_before_loading(base, tmp_path, no_work, capsys, method):
    out = tmp_path / "out"
    assert_cli_refused(["prune", _src(base), "--method", method, "--ratio", "0.25", "--as-you-go", *_calib(base),
                        "--out", out], [r"--as-you-go", rf"'{method}' is \w+-based"], capsys,
                       inputs=[_src(base)], out=out)


# ------------------------------------------------------------------------------- 7. --policy reconstruction
def test_policy_reconstruction_with_method_refused(base, tmp_path, no_work, capsys):
    out = tmp_path / "out"
    assert_cli_refused(["prune", _src(base), "--method", "reap", "--ratio", "0.25", "--policy", "reconstruction",
                        *_calib(base), "--out", out], [r"--policy reconstruction", r"--method reap"], capsys,
                       inputs=[_src(base)], out=out)


def test_policy_reconstruction_alone_runs_naee(base, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", str(_src(base)), "--ratio", "0.25", "--policy", "reconstruction", *_calib(base),
                 "--out", str(out)]) == 0
    report = _report(out)
    plan = json.loads((out / report["stages"][0]["plan"]).read_text())
    assert plan["method"] == report["method"] == "naee_reconstruction"
    assert report["verify"]["passed"] and report["num_experts_after"] == 6
    assert AutoConfig.from_pretrained(out).num_experts == 6
    assert main(["verify", str(_src(base)), str(out)]) == 0


# ------------------------------------------------------------------------------- 8. data-parallel ranks
@pytest.mark.parametrize("tqdm_before", [None, "0"])
@pytest.mark.parametrize("raises", [False, True])
def test_quiet_unless_main_restores_logger_and_environment(monkeypatch, keep_log_level, tqdm_before, raises):
    from moeprune.calibration.run import quiet_unless_main

    logger.setLevel(logging.DEBUG)
    if tqdm_before is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", tqdm_before)
    inside = {}
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with quiet_unless_main(False):
            inside = {"level": logger.level, "tqdm": os.environ.get("TQDM_DISABLE")}
            if raises:
                raise RuntimeError("calibration failed")
    assert inside == {"level": logging.WARNING, "tqdm": "1"}  # it did quieten this rank
    assert logger.level == logging.DEBUG
    assert os.environ.get("TQDM_DISABLE") == tqdm_before
    assert ("TQDM_DISABLE" in os.environ) == (tqdm_before is not None)


@pytest.mark.parametrize("tqdm_before", [None, "0"])
def test_quiet_unless_main_on_the_main_rank_changes_nothing(monkeypatch, keep_log_level, tqdm_before):
    from moeprune.calibration.run import quiet_unless_main

    logger.setLevel(logging.INFO)
    if tqdm_before is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", tqdm_before)
    env = dict(os.environ)
    with quiet_unless_main(True):
        assert logger.level == logging.INFO and dict(os.environ) == env
    assert logger.level == logging.INFO and dict(os.environ) == env


# ------------------------------------------------------------------------------- 9. verify, arguments swapped
def test_verify_with_swapped_arguments_hints_the_order(base, tmp_path, capsys):
    src, export = _src(base), tmp_path / "export"
    assert main(["prune", str(src), *EXPERT, "--no-verify", "--out", str(export)]) == 0
    err = assert_cli_refused(["verify", export, src], [r"swap"], capsys, inputs=[src, export], out=None)
    assert "moeprune verify ORIGINAL EXPORT" in err


# ------------------------------------------------------------------------------- 10. plan --out FILE
def test_plan_out_needs_overwrite(base, tmp_path, capsys):
    src, file = _src(base), tmp_path / "plan.json"
    file.write_text("precious\n")
    assert_cli_refused(["plan", src, *EXPERT, "--out", file], [r"already exists", r"--overwrite"], capsys,
                       inputs=[src, tmp_path], out=None)
    assert file.read_text() == "precious\n"
    assert main(["plan", str(src), *EXPERT, "--out", str(file), "--overwrite"]) == 0
    plan = json.loads(file.read_text())
    assert plan["method"] == "aimer" and plan["ratio"] == 0.25
    assert all(len(kept) == 6 for kept in plan["kept_experts"].values())


# ------------------------------------------------------------------------------- 11. Ctrl-C
def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["api.info", "cli.prune.run"])
def test_ctrl_c_exits_130_with_one_line(base, tmp_path, monkeypatch, capfd, fresh_log_handler, where):
    import moeprune.api
    import moeprune.cli.prune

    module, name = (moeprune.api, "info") if where == "api.info" else (moeprune.cli.prune, "run")
    monkeypatch.setattr(module, name, _interrupt)
    argv = ["info", str(_src(base))] if name == "info" else ["prune", str(_src(base)), *EXPERT,
                                                            "--out", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    capfd.readouterr()
    assert main(argv) == 130
    captured = capfd.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeprune: interrupted"), captured.err
    assert "Traceback" not in captured.err + captured.out and captured.out == ""
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- 12. verify line once
@pytest.mark.parametrize("argv", [EXPERT, [*KINDS["neurons"], "--expert-method", "frequency",
                                           "--expert-ratio", "0.25"]], ids=["one-stage", "two-stage"])
def test_verify_line_printed_once_per_prune(base, tmp_path, capfd, fresh_log_handler, argv):
    calib = [] if argv is EXPERT else _calib(base)
    capfd.readouterr()
    assert main(["prune", str(_src(base)), *argv, *calib, "--out", str(tmp_path / "out")]) == 0
    captured = capfd.readouterr()
    assert captured.out.count(VERIFY_LINE) == 1 and re.search(VERIFY_LINE + r".*-> PASS\n", captured.out)
    assert VERIFY_LINE not in captured.err
    assert "[moeprune]" in captured.err  # the log handler did write to this test's stderr

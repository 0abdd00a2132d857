"""Bad inputs: each one is refused with a MoePruneError (CLI: exit 2, message on stderr, no traceback) whose
message says what to change; it is raised before any expensive work (reading expert weights, loading the model,
creating the output), nothing is left behind (no --out folder, no `.out.tmp-*` / `.out.old-*` siblings) and the
input checkpoint is byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from safetensors import safe_open

from moeprune import api
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter, supported_families
from moeprune.select.plan import PrunePlan
from moeprune.select.uniform import drop_count
from moeprune.tiny import save_tiny

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def qwen(root) -> Path:
    """qwen3_moe tiny: 3 layers, layer 0 dense, MoE layers 1 and 2, E=8, top-2."""
    return save_tiny("qwen3_moe", root / "qwen3_moe", seed=1)


@pytest.fixture(scope="module")
def deepseek(root) -> Path:
    """deepseek_v3 tiny: MoE layers 1 and 2, E=8 in 2 router groups of 4, top-2 from 1 group."""
    return save_tiny("deepseek_v3", root / "deepseek_v3", seed=1)


@pytest.fixture(scope="module")
def dense(root) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen3",
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=96,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    path = root / "dense_qwen3"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def granite(root) -> Path:
    """A transformers MoE family without a moeprune adapter (GraniteMoE: E=8, top-2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "granitemoe",
        hidden_size=32,
        intermediate_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        num_hidden_layers=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    path = root / "granitemoe"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # precondition of the test: the saved layout is one the generic fallback cannot recognise
    assert any(".block_sparse_moe.input_linear." in k for k in keys)
    assert not any(".experts." in k for k in keys), keys
    return path


@pytest.fixture
def copy_of(tmp_path):
    """A private copy of a checkpoint (for tests that corrupt it or could, if buggy, delete it)."""

    def _copy(src: Path, name: str = "model") -> Path:
        return Path(shutil.copytree(src, tmp_path / "inputs" / name))

    return _copy


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive step fail loudly: a refusal must come before any of them."""

    def forbid(name):
        def _fail(*args, **kwargs):
            raise AssertionError(f"api.{name} ran before the bad input was refused")

        return _fail

    for name in (
        "summarize_checkpoint",
        "load_model",
        "apply_in_memory",
        "apply_plan_streaming",
        "atomic_dir",
        "_verify",
    ):
        monkeypatch.setattr(api, name, forbid(name))


# ----------------------------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (sha256) and folder under `folder`, by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def leftovers(out: Path) -> list[str]:
    """Temporary or backup siblings of `out` (`.out.tmp-*`, `.out.old-*`) and `*.tmp` files."""
    parent = out.parent
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.") or p.name.endswith(".tmp"))


def assert_refused(call, match: str, *, inputs: list[Path], out: Path | None) -> MoePruneError:
    """call() raises MoePruneError matching `match`; inputs unchanged; `out` and temp siblings absent."""
    before = {p: snapshot(p) for p in inputs if p.exists()}
    out_existed = out is not None and out.exists()
    with pytest.raises(MoePruneError, match=match) as info:
        call()
    for p, snap in before.items():
        assert snapshot(p) == snap, f"input {p} was modified"
    if out is not None:
        if not out_existed:
            assert not out.exists(), f"{out} was left behind"
        assert leftovers(out) == []
    return info.value


def assert_cli_refused(argv: list, patterns: list[str], capsys, *, inputs: list[Path], out: Path | None) -> str:
    """main(argv) returns 2 with `moeprune: error: ...` on stderr (matching every pattern) and no traceback."""
    before = {p: snapshot(p) for p in inputs if p.exists()}
    out_existed = out is not None and out.exists()
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert captured.err.startswith("moeprune: error: "), captured.err
    assert "Traceback" not in captured.err
    for pattern in patterns:
        assert re.search(pattern, captured.err), (pattern, captured.err)
    for p, snap in before.items():
        assert snapshot(p) == snap, f"input {p} was modified"
    if out is not None:
        if not out_existed:
            assert not out.exists(), f"{out} was left behind"
        assert leftovers(out) == []
    return captured.err


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


def test_unknown_moe_architecture(granite, tmp_path, no_work, capsys):
    out = tmp_path / "out"
    match = r"unknown MoE architecture 'granitemoe'"
    err = assert_refused(lambda: api.prune(granite, out, method="aimer", ratio=0.25), match, inputs=[granite], out=out)
    msg = str(err)
    families = supported_families()
    assert len(families) >= 8
    for family in families:
        assert family in msg, f"supported family {family} not named in: {msg}"
    assert "docs/adding-a-model.md" in msg
    assert "adapter" in msg
    assert_refused(lambda: api.info(granite), match, inputs=[granite], out=None)
    assert_cli_refused(
        ["plan", granite, "--method", "aimer", "--ratio", "0.25"],
        [match, r"Supported families: .*qwen3_moe", r"docs/adding-a-model\.md"],
        capsys,
        inputs=[granite],
        out=None,
    )


# ----------------------------------------------------------------------------------------------- ratios

OUT_OF_RANGE = r"--ratio must be a fraction strictly between 0 and 1 \(e\.g\. 0\.25\)"
RATIO_CASES = [
    ("qwen", 0.0, OUT_OF_RANGE),
    ("qwen", 1.0, OUT_OF_RANGE),
    ("qwen", 1.5, OUT_OF_RANGE),
    ("qwen", -0.2, OUT_OF_RANGE),
    ("qwen", float("nan"), OUT_OF_RANGE),
    ("qwen", 0.01, r"--ratio 0\.01 drops 0 of 8 experts per layer; use at least 0\.125\."),
    ("qwen", 0.9, r"--ratio 0\.9 keeps 1 experts per layer, fewer than the router's top-2; use a ratio <= 0\.75\."),
    ("deepseek", 0.1, r"drops 0 of 8 experts per layer \(2 groups of 4\); use at least 0\.25\."),
    (
        "deepseek",
        0.75,
        r"keeps 1 experts per router group but this group-limited router needs at least 2 per "
        r"group; use a ratio <= 0\.5\.",
    ),
]


@pytest.mark.parametrize("family,ratio,match", RATIO_CASES, ids=[f"{f}-{r}" for f, r, _ in RATIO_CASES])
def test_invalid_ratio(family, ratio, match, request, tmp_path, no_work, capsys):
    model = request.getfixturevalue(family)
    out = tmp_path / "out"
    assert_refused(lambda: api.prune(model, out, method="aimer", ratio=ratio), match, inputs=[model], out=out)
    assert_refused(lambda: api.make_plan(model, "aimer", ratio), match, inputs=[model], out=None)
    assert_cli_refused(
        ["prune", model, "--method", "aimer", "--ratio", str(ratio), "--out", out],
        [match],
        capsys,
        inputs=[model],
        out=out,
    )
    assert_cli_refused(
        ["plan", model, "--method", "weight_norm", "--ratio", str(ratio)], [match], capsys, inputs=[model], out=None
    )


SUGGESTING = [c for c in RATIO_CASES if re.search("use (at least|a ratio)", c[2])]


@pytest.mark.parametrize("family,ratio,match", SUGGESTING, ids=[f"{f}-{r}" for f, r, _ in SUGGESTING])
def test_suggested_ratio_works(family, ratio, match, request):
    """The ratio the message suggests is accepted and gives a valid plan (the message says what to change)."""
    model = request.getfixturevalue(family)
    with pytest.raises(MoePruneError) as info:
        api.make_plan(model, "random", ratio)
    suggested = float(re.search(r"use (?:at least|a ratio <=) ([0-9.]+[0-9])", str(info.value)).group(1))
    plan = api.make_plan(model, "random", suggested)
    ckpt = Checkpoint.open(model)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    plan.validate(adapter)
    assert 0 < plan.num_experts - plan.kept_count == drop_count(suggested, 8, adapter.routing())


def test_ratio_not_a_number_cli(qwen, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["prune", str(qwen), "--method", "aimer", "--ratio", "quarter", "--out", str(out)])
    assert info.value.code == 2
    assert "--ratio must be a number like 0.25, got 'quarter'" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- plan files


def plan_json(kept: dict, num_experts: int = 8, model_type: str | None = "qwen3_moe") -> str:
    return json.dumps(
        {
            "format": "moeprune.plan/1",
            "model_type": model_type,
            "num_experts": num_experts,
            "method": "manual",
            "ratio": 0.25,
            "kept_experts": {str(k): v for k, v in kept.items()},
        }
    )


K6 = [0, 1, 2, 3, 4, 5]
PLAN_CASES = {
    # name: (model, JSON text, expected message)
    "missing_layer": (
        "qwen",
        plan_json({1: K6}),
        r"plan has no entry for MoE layers \[2\]; list every MoE layer "
        r"\[1, 2\]",
    ),
    "layer_not_moe": (
        "qwen",
        plan_json({0: K6, 1: K6, 2: K6}),
        r"plan names layers \[0\] that are not MoE layers "
        r"\(MoE layers: \[1, 2\]\)",
    ),
    "layer_out_of_model": ("qwen", plan_json({1: K6, 2: K6, 7: K6}), r"plan names layers \[7\] that are not MoE"),
    "duplicate_key_text": (
        "qwen",
        '{"format": "moeprune.plan/1", "num_experts": 8, "kept_experts": '
        '{"1": [0, 1, 2, 3, 4, 5], "2": [0, 1, 2, 3, 4, 5], "1": [0, 1, 2, 3, 4, 6]}}',
        r"plan JSON has the key '1' twice \(a layer listed twice\?\); keep one",
    ),
    "duplicate_layer_spelled_twice": (
        "qwen",
        '{"num_experts": 8, "kept_experts": {"1": [0, 1, 2, 3, 4, 5], '
        '"01": [0, 1, 2, 3, 4, 5], "2": [0, 1, 2, 3, 4, 5]}}',
        r"layer 1 appears twice in kept_experts",
    ),
    "duplicate_expert": (
        "qwen",
        plan_json({1: K6, 2: [0, 1, 1, 3, 4, 5]}),
        r"layer 2: experts \[1\] are listed more than once in kept_experts",
    ),
    "out_of_range_expert": (
        "qwen",
        plan_json({1: [0, 1, 2, 3, 4, 8], 2: K6}),
        r"layer 1: expert indices \[8\] are outside 0\.\.7",
    ),
    "negative_expert": (
        "qwen",
        plan_json({1: K6, 2: [-1, 1, 2, 3, 4, 5]}),
        r"layer 2: expert indices \[-1\] are outside 0\.\.7",
    ),
    "unsorted": (
        "qwen",
        plan_json({1: [0, 1, 2, 3, 5, 4], 2: K6}),
        r"layer 1: kept_experts must be ascending .*; sort it",
    ),
    "fewer_than_top_k": (
        "qwen",
        plan_json({1: [3], 2: [4]}),
        r"layer 1: keeps 1 experts but the router selects top-2; keep at least 2",
    ),
    "wrong_num_experts": (
        "qwen",
        plan_json({1: K6, 2: K6}, num_experts=16),
        r"plan was made for 16 experts per layer but the model has 8",
    ),
    "wrong_model_type": (
        "qwen",
        plan_json({1: K6, 2: K6}, model_type="mixtral"),
        r"plan was made for model_type 'mixtral', not 'qwen3_moe'",
    ),
    "non_uniform_counts": (
        "qwen",
        plan_json({1: K6, 2: [0, 1, 2, 3]}),
        r"plan keeps different expert counts per layer \{1: 6, 2: 4\}.*Keep the same number in "
        r"every layer",
    ),
    "non_integer_expert": (
        "qwen",
        plan_json({1: K6, 2: [0, 1, 2, 3, 4, True]}),
        r"kept_experts\['2'\] must be a list of integer expert indices",
    ),
    "layer_key_not_int": ("qwen", plan_json({"one": K6, 2: K6}), r"layer key 'one' is not a decoder-layer index"),
    "missing_num_experts": (
        "qwen",
        '{"kept_experts": {"1": [0, 1, 2, 3, 4, 5], "2": [0, 1, 2, 3, 4, 5]}}',
        r"missing 'num_experts'",
    ),
    "not_json": ("qwen", '{"num_experts": 8, "kept_experts": {"1": [0, 1,', r"is not valid JSON"),
    "deepseek_unequal_groups": (
        "deepseek",
        plan_json({1: [0, 1, 2, 4, 5, 6], 2: K6}, model_type="deepseek_v3"),
        r"layer 2: the router is group-limited \(2 groups of 4\) and the plan keeps \[4, 2\] "
        r"experts per group; keep the same number in every group",
    ),
    "deepseek_too_few_per_group": (
        "deepseek",
        plan_json({1: [0, 4], 2: [1, 5]}, model_type="deepseek_v3"),
        r"layer 1: keeps 1 experts per group but the group-limited router needs at "
        r"least 2 per group",
    ),
}


def test_plan_controls_are_valid(qwen, deepseek):
    """The good plans the cases are derived from pass validation (so each case fails for its one defect)."""
    for model, kept, model_type in (
        (qwen, {1: K6, 2: K6}, "qwen3_moe"),
        (deepseek, {1: [0, 1, 2, 4, 5, 6], 2: [0, 1, 2, 4, 5, 6]}, "deepseek_v3"),
        (deepseek, {1: [0, 1, 4, 5], 2: [2, 3, 6, 7]}, "deepseek_v3"),
    ):
        ckpt = Checkpoint.open(model)
        PrunePlan.from_dict(json.loads(plan_json(kept, model_type=model_type))).validate(
            get_adapter(ckpt.config, weight_keys=ckpt.names())
        )


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_bad_plan(case, request, tmp_path, no_work, capsys):
    family, text, match = PLAN_CASES[case]
    model = request.getfixturevalue(family)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(text)
    out = tmp_path / "out"
    inputs = [model, tmp_path]  # the plan file is not touched either
    assert_refused(lambda: api.apply_plan(model, PrunePlan.load(plan_file), out), match, inputs=inputs, out=out)
    assert_refused(
        lambda: api.apply_plan(model, PrunePlan.load(plan_file), out, streaming=True), match, inputs=inputs, out=out
    )
    assert_cli_refused(["apply", model, "--plan", plan_file, "--out", out], [match], capsys, inputs=inputs, out=out)


def test_plan_file_missing(qwen, tmp_path, no_work, capsys):
    out = tmp_path / "out"
    match = r"plan file .*nope\.json does not exist\. Make one with `moeprune plan MODEL \.\.\. --out`"
    assert_refused(lambda: PrunePlan.load(tmp_path / "nope.json"), match, inputs=[qwen], out=None)
    assert_cli_refused(
        ["apply", qwen, "--plan", tmp_path / "nope.json", "--out", out], [match], capsys, inputs=[qwen], out=out
    )


# ----------------------------------------------------------------------------------------------- output folder


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
    out.mkdir()
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

    monkeypatch.setattr(api, "apply_in_memory", boom)
    out = tmp_path / "out"
    assert_refused(
        lambda: api.prune(qwen, out, method="aimer", ratio=0.25), "simulated failure", inputs=[qwen], out=out
    )
    # with --overwrite, the existing folder survives a failed run untouched
    out.mkdir()
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
    match = r"unknown method 'aimr'\. Did you mean 'aimer'\? Choose one of: aimer, random, weight_norm\."
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
    # no close match: still lists the choices
    assert_refused(
        lambda: api.make_plan(qwen, "xyzzy", 0.25),
        r"unknown method 'xyzzy'\. Choose one of: aimer",
        inputs=[qwen],
        out=None,
    )


# ----------------------------------------------------------------------------------------------- known bugs


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

"""Bad plans and ratios: refused with a message that says what to change, before any work, leaving nothing."""

from __future__ import annotations

import json
import re

import pytest

from moeprune import api
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.select.plan import PrunePlan
from moeprune.select.uniform import drop_count
from refusal import assert_cli_refused, assert_refused, leftovers, snapshot  # noqa: F401

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

"""Plans and budgets that cannot be honoured are refused with a MoePruneError that names what to change:
malformed merge-plan JSON (never a KeyError/TypeError/ValueError), merge plans that do not fit the model (the bad
index, layer and valid range named), and neuron budgets that the aligned widths / min-width cannot keep exactly
(refused by `check_budget` before any score exists)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.merge.plan import MergePlan
from moeprune.models import get_adapter
from moeprune.select.neurons import check_budget, expert_width_kept, select_neurons
from moeprune.tiny import save_tiny, tiny_config
from refusal import assert_cli_refused

# ---------------------------------------------------------------------------------------- neuron budgets


def test_unachievable_aligned_ratio_is_refused_with_the_nearby_achievable_ratios():
    # width 64, align 8: 0.99 keeps 0.64 neurons -> the narrowest aligned width is 8, i.e. removes 0.875
    assert expert_width_kept(0.99, 64, 1, 8) == 8  # what the selection would silently have done
    with pytest.raises(MoePruneError) as info:
        check_budget(0.99, "expert", 1, 64, align=8)
    msg = str(info.value)
    assert "--ratio 0.99" in msg and "0.875" in msg and "0.75" in msg, msg  # removed fractions of widths 8 and 16
    assert "multiples of 8" in msg and "grouped_mm" in msg, msg
    assert "min-width" not in msg, msg  # min_width 1 is not the cause
    with pytest.raises(MoePruneError, match="Achievable ratios nearby: 0.75 .* or 0.875"):
        select_neurons({1: torch.rand(2, 64)}, 0.99, "expert", align=8)


@pytest.mark.parametrize("ratio,kept", [(0.25, 48), (0.5, 32), (0.875, 8), (0.3, 48), (0.45, 32)])
def test_achievable_aligned_ratios_are_accepted(ratio, kept):
    check_budget(ratio, "expert", 1, 64, align=8)  # 0.3 and 0.45: within half a step (8/128) of 0.25 / 0.5
    got = select_neurons({1: torch.rand(3, 64, generator=torch.Generator().manual_seed(0))}, ratio, "expert", align=8)
    assert {len(v) for v in got[1].values()} == {kept}


def test_every_accepted_expert_budget_is_honoured_within_half_an_alignment_step():
    for width in (16, 60, 64, 96):
        for align in (1, 8):
            for min_width in (1, 5, 12):
                for ratio in [k / 200 for k in range(1, 200)]:
                    try:
                        check_budget(ratio, "expert", min_width, width, align=align)
                    except MoePruneError:
                        continue
                    n = expert_width_kept(ratio, width, min_width, align)
                    assert n % align == 0 and min_width <= n < width, (width, align, min_width, ratio, n)
                    assert abs(1 - n / width - ratio) <= align / (2 * width) + 1e-9, (width, align, ratio, n)


def test_ratio_that_removes_nothing_is_refused():
    with pytest.raises(MoePruneError, match="nothing would be removed.*0.125 \\(keeps 56"):
        check_budget(0.05, "expert", 1, 64, align=8)
    with pytest.raises(MoePruneError, match="nothing would be removed"):
        check_budget(0.001, "expert", 1, 64)
    with pytest.raises(MoePruneError, match="cannot narrow experts of width 8"):
        check_budget(0.5, "expert", 1, 8, align=8)
    with pytest.raises(MoePruneError, match="nothing would be removed"):
        check_budget(1e-4, "global", 1, 16, num_experts=8, num_layers=2)


def test_expert_budget_min_width_that_overrides_the_ratio_is_named():
    with pytest.raises(MoePruneError) as info:
        check_budget(0.75, "expert", 20, 64, align=8)  # ratio keeps 16; min-width 20 -> 24 (aligned)
    msg = str(info.value)
    assert "--min-width 20 forces 24" in msg and "keeps 16 of 64" in msg and "Lower --min-width to at most 16" in msg
    with pytest.raises(MoePruneError, match="--min-width 20 forces 20 neurons"):
        check_budget(0.75, "expert", 20, 64)
    check_budget(0.75, "expert", 16, 64)  # min-width equal to the kept width: fine
    with pytest.raises(MoePruneError, match="--min-width 65 must lie in \\[1, expert width 64\\]"):
        check_budget(0.5, "expert", 65, 64)


@pytest.mark.parametrize("budget,G", [("layer", 1), ("global", 3)])
def test_layer_and_global_budgets_refused_before_any_scores(budget, G):
    E, I = 8, 16
    # min_width 3 needs G·E·3 neurons; ratio 0.9 keeps round(0.1·G·E·I) = 0.1·128·G < 3·8·G
    with pytest.raises(MoePruneError) as info:
        check_budget(0.9, budget, 3, I, num_experts=E, num_layers=G)
    msg = str(info.value)
    assert f"--min-width 3 alone needs {G * E * 3}" in msg and "lower --min-width to at most 1" in msg, msg
    # min_width 1 cannot be lowered: suggest lowering --ratio only
    with pytest.raises(MoePruneError) as info:
        check_budget(0.99, budget, 1, I, num_experts=E, num_layers=G)
    msg = str(info.value)
    assert "lower --ratio to at most" in msg and "lower --min-width" not in msg, msg
    # the limit: every expert keeps exactly min_width
    check_budget(1 - 3 / I, budget, 3, I, num_experts=E, num_layers=G)
    # without counts (old callers) the layer/global totals cannot be checked yet: no refusal
    check_budget(0.9, budget, 3, I)


def test_select_neurons_min_width_message_logic():
    scores = {1: torch.rand(4, 12), 3: torch.rand(4, 12)}
    with pytest.raises(MoePruneError) as info:
        select_neurons(scores, 0.95, "global", min_width=1)  # keeps 5 of 96, 8 experts need one each
    assert "lower --min-width" not in str(info.value) and "lower --ratio" in str(info.value)
    with pytest.raises(MoePruneError, match="min-width 10 alone needs 80.*lower --min-width to at most 6"):
        select_neurons(scores, 0.5, "global", min_width=10)
    with pytest.raises(MoePruneError, match="min-width 7 alone needs 28"):
        select_neurons(scores, 0.5, "layer", min_width=7)  # each layer keeps 24 < 4·7


# ---------------------------------------------------------------------------------------- merge plans: JSON

E = 8
GOOD_GROUPS = [[0, 3], [1], [2], [4], [5, 6, 7]]
GOOD_WEIGHTS = [[0.7, 0.3], [1.0], [1.0], [1.0], [0.5, 0.2, 0.3]]


def _good() -> dict:
    """A valid merge plan for the tiny qwen3_moe (MoE layers 1 and 2, E=8, top-2)."""
    return {"format": "moeprune.merge/1", "model_type": "qwen3_moe", "num_experts": E, "method": "manual",
            "ratio": 0.375, "merge": "average", "router": "dominant", "rank": None, "threshold": 0.4, "note": None,
            "groups": {"1": [list(g) for g in GOOD_GROUPS], "2": [list(g) for g in GOOD_GROUPS]},
            "weights": {"1": [list(w) for w in GOOD_WEIGHTS], "2": [list(w) for w in GOOD_WEIGHTS]}}


def _set(key, value):
    def edit(d):
        d[key] = value
        return d
    return edit


def _drop(key):
    def edit(d):
        del d[key]
        return d
    return edit


def _group(layer, value):
    def edit(d):
        d["groups"][layer] = value
        return d
    return edit


def _weight(layer, value):
    def edit(d):
        d["weights"][layer] = value
        return d
    return edit


def _member(value, group=1):  # replace the only member of group 1 ([1]) in layer "1"
    return _group("1", [[0, 3], [value], [2], [4], [5, 6, 7]] if group == 1 else None)


# (case id, edit of the valid dict (or a whole replacement), substrings the message must hold)
MALFORMED = [
    ("not-object-list", lambda d: [d], ["JSON object", "a list"]),
    ("not-object-str", lambda d: "groups", ["JSON object", "a string"]),
    ("not-object-null", lambda d: None, ["JSON object", "null"]),
    ("format-missing", _drop("format"), ["'format'", "moeprune.merge/1"]),
    ("format-prune-plan", lambda d: {"format": "moeprune.plan/1", "num_experts": 8, "kept_experts": {}},
     ["expert-removal plan"]),
    ("unknown-key", lambda d: {**d, "weight": d["weights"]}, ["'weight'", "did you mean 'weights'"]),
    ("num-experts-missing", _drop("num_experts"), ["'num_experts'"]),
    ("num-experts-str", _set("num_experts", "8"), ["'num_experts'", '"8"']),
    ("num-experts-float", _set("num_experts", 8.0), ["'num_experts'", "8.0"]),
    ("num-experts-bool", _set("num_experts", True), ["'num_experts'", "true"]),
    ("num-experts-zero", _set("num_experts", 0), ["'num_experts'", "0"]),
    ("num-experts-null", _set("num_experts", None), ["'num_experts'", "null"]),
    ("groups-missing", _drop("groups"), ["'groups'", "missing"]),
    ("groups-list", _set("groups", [GOOD_GROUPS]), ["'groups'", "a list"]),
    ("groups-empty", _set("groups", {}), ["'groups'", "empty"]),
    ("layer-key-word", lambda d: {**d, "groups": {"one": GOOD_GROUPS, "2": GOOD_GROUPS}}, ["groups key 'one'"]),
    ("layer-key-negative", lambda d: {**d, "groups": {"-1": GOOD_GROUPS, "2": GOOD_GROUPS}}, ["groups key '-1'"]),
    ("layer-key-float", lambda d: {**d, "groups": {"1.0": GOOD_GROUPS, "2": GOOD_GROUPS}}, ["groups key '1.0'"]),
    ("layer-key-twice", lambda d: {**d, "groups": {**d["groups"], "01": GOOD_GROUPS}},
     ["layer 1 appears twice", "'01'"]),
    ("layer-not-list", _group("1", "0,3|1|2"), ["groups['1'] (layer 1)", '"0,3|1|2"']),
    ("layer-dict", _group("1", {"0": [0, 3]}), ["groups['1'] (layer 1)"]),
    ("layer-empty", _group("1", []), ["groups['1'] (layer 1)", "non-empty"]),
    ("flat-group", _group("1", [0, 1, 2, 3, 4, 5, 6, 7]), ["groups['1'] (layer 1), group 0", "0"]),
    ("group-empty", _group("1", [[0, 3], [], [1], [2], [4], [5, 6, 7]]), ["groups['1'] (layer 1), group 1"]),
    ("member-str", _member("1"), ["layer 1", "group 1", 'member "1"']),
    ("member-float", _member(1.0), ["layer 1", "group 1", "member 1.0"]),
    ("member-bool", _member(True), ["layer 1", "group 1", "member true"]),
    ("member-null", _member(None), ["layer 1", "group 1", "member null"]),
    ("member-list", _member([1]), ["layer 1", "group 1", "member [1]"]),
    ("member-99", _member(99), ["layer 1", "expert index 99", "0..7"]),
    ("member-negative", _member(-1), ["layer 1", "expert index -1", "0..7"]),
    ("member-repeated", _group("1", [[0, 3, 3], [1], [2], [4], [5, 6, 7]]), ["layer 1", "repeated [3]"]),
    ("member-missing", _group("1", [[0, 3], [1], [2], [4], [5, 6]]), ["layer 1", "missing [7]"]),
    ("dominants-unsorted", _group("2", [[1], [0, 3], [2], [4], [5, 6, 7]]), ["layer 2", "dominant"]),
    ("weights-list", _set("weights", [GOOD_WEIGHTS]), ["'weights'", "a list"]),
    ("weights-str", _set("weights", "usage"), ["'weights'", "a string"]),
    ("weights-key-word", lambda d: {**d, "weights": {"x": GOOD_WEIGHTS, **d["weights"]}}, ["weights key 'x'"]),
    ("weights-extra-layer", _weight("5", GOOD_WEIGHTS), ["weights['5'] (layer 5)", "no merge groups"]),
    ("weights-missing-layer", lambda d: {**d, "weights": {"1": GOOD_WEIGHTS}}, ["'weights'", "layers [2]"]),
    ("weights-group-count", _weight("1", GOOD_WEIGHTS[:4]), ["weights['1'] (layer 1)", "5 groups"]),
    ("weights-member-count", _weight("1", [[0.7], [1.0], [1.0], [1.0], [0.5, 0.2, 0.3]]),
     ["weights['1'] (layer 1), group 0 [0, 3]", "2 usage"]),
    ("weights-flat", _weight("2", [0.7, 0.3, 1.0, 1.0, 1.0]), ["weights['2'] (layer 2), group 0"]),
    ("weight-str", _weight("1", [["0.7", 0.3], [1.0], [1.0], [1.0], [0.5, 0.2, 0.3]]),
     ["weights['1'] (layer 1), group 0", 'weight "0.7"']),
    ("weight-bool", _weight("1", [[True, 0.3], [1.0], [1.0], [1.0], [0.5, 0.2, 0.3]]),
     ["weights['1'] (layer 1), group 0", "weight true"]),
    ("weight-nan", _weight("1", [[float("nan"), 0.3], [1.0], [1.0], [1.0], [0.5, 0.2, 0.3]]),
     ["weights['1'] (layer 1), group 0", "finite"]),
    ("weight-inf", _weight("2", [[0.7, 0.3], [1.0], [1.0], [1.0], [0.5, float("inf"), 0.3]]),
     ["weights['2'] (layer 2), group 4", "finite"]),
    ("weight-negative", _weight("1", [[0.7, -0.3], [1.0], [1.0], [1.0], [0.5, 0.2, 0.3]]), ["layer 1", ">= 0"]),
    ("weight-zero-sum", _weight("2", [[0.7, 0.3], [0.0], [1.0], [1.0], [0.5, 0.2, 0.3]]),
     ["layer 2", "positive sum"]),
    ("rank-zero", _set("rank", 0), ["'rank'", "0"]),
    ("rank-negative", _set("rank", -4), ["'rank'", "-4"]),
    ("rank-float", _set("rank", 2.5), ["'rank'", "2.5"]),
    ("rank-str", _set("rank", "full"), ["'rank'", '"full"']),
    ("rank-bool", _set("rank", True), ["'rank'", "true"]),
    ("threshold-str", _set("threshold", "high"), ["'threshold'", '"high"']),
    ("threshold-null", _set("threshold", None), ["'threshold'", "null"]),
    ("threshold-bool", _set("threshold", False), ["'threshold'", "false"]),
    ("threshold-nan", _set("threshold", float("nan")), ["'threshold'", "NaN"]),
    ("threshold-dern-range", lambda d: {**d, "merge": "dern", "threshold": 2}, ["--threshold 2", "[-1, 1]"]),
    ("merge-typo", _set("merge", "averge"), ["'merge'", "'averge'", "Did you mean 'average'"]),
    ("merge-unknown", _set("merge", "ties"), ["'merge'", "'ties'", "average, dern, svd"]),
    ("merge-number", _set("merge", 3), ["'merge'", "3"]),
    ("merge-null", _set("merge", None), ["'merge'", "null"]),
    ("router-unknown", _set("router", "mean"), ["'router'", "'mean'", "dominant, weighted"]),
    ("router-list", _set("router", ["dominant"]), ["'router'", '["dominant"]']),
    ("ratio-str", _set("ratio", "0.5"), ["'ratio'", '"0.5"']),
    ("method-number", _set("method", 5), ["'method'", "5"]),
    ("model-type-list", _set("model_type", ["qwen3_moe"]), ["'model_type'"]),
]


@pytest.mark.parametrize("edit,needles", [pytest.param(e, n, id=i) for i, e, n in MALFORMED])
@pytest.mark.parametrize("via", ["dict", "file"])
def test_malformed_merge_plan_is_a_clear_error(edit, needles, via, tmp_path):
    raw = edit(_good())
    if via == "dict":
        source = "edited.json"
        call = lambda: MergePlan.from_dict(raw, source=source)  # noqa: E731
    else:
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(raw))
        source = str(path)
        call = lambda: MergePlan.load(path)  # noqa: E731
    with pytest.raises(MoePruneError) as info:  # any other exception type fails the test
        call()
    msg = str(info.value)
    assert source in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("content,needles", [
    (b'{"format": "moeprune.merge/1", "groups": {"1": [[0]], "1": [[1]]}}', ["the key '1' twice"]),
    (b'{"format": "moeprune.merge/1", "groups": ', ["not valid JSON"]),
    (b"\xff\xfe\x00garbage", ["UTF-8"]),
    (b"[" * 100_000, ["JSON"]),
    (b"", ["not valid JSON"]),
], ids=["duplicate-key", "truncated", "binary", "deep", "empty"])
def test_unreadable_merge_plan_file_is_a_clear_error(content, needles, tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(MoePruneError) as info:
        MergePlan.load(path)
    msg = str(info.value)
    assert str(path) in msg and all(n in msg for n in needles), msg
    with pytest.raises(MoePruneError, match="does not exist"):
        MergePlan.load(tmp_path / "absent.json")


def test_valid_merge_plan_round_trips(tmp_path):
    plan = MergePlan.from_dict(_good())
    assert plan.groups[1] == GOOD_GROUPS and plan.weights[2] == GOOD_WEIGHTS and plan.ratio == 0.375
    assert MergePlan.load(plan.save(tmp_path / "p.json")) == plan
    no_weights = {k: v for k, v in _good().items() if k != "weights"}
    assert MergePlan.from_dict(no_weights).weights[1] == [[1.0] * len(g) for g in GOOD_GROUPS]  # equal weights
    svd = MergePlan.from_dict({**_good(), "merge": "svd", "rank": 3, "threshold": 1})
    assert svd.rank == 3 and svd.threshold == 1.0


# ---------------------------------------------------------------------------------------- merge plans: the model


@pytest.fixture(scope="module")
def qwen_adapter():
    """tiny qwen3_moe from its config: 3 layers, layer 0 dense, MoE layers 1 and 2, E=8, top-2."""
    adapter = get_adapter(tiny_config("qwen3_moe"))
    assert adapter.moe_layers() == [1, 2] and adapter.num_experts == E and adapter.routing().top_k == 2
    return adapter


def _plan(groups: dict, num_experts: int = E):
    return MergePlan(groups, num_experts)


GOOD = [[0, 3], [1], [2], [4], [5, 6, 7]]


@pytest.mark.parametrize("groups,needles,absent", [
    # an out-of-range index is named (layer, index, range), not reported as "missing [...], repeated [...]"
    ({1: [[0, 3], [1], [2], [4], [5, 6, 99]], 2: GOOD}, ["layer 1", "[99]", "0..7"], ["missing"]),
    ({1: GOOD, 2: [[0, 3], [1], [2], [4], [5, 6, 7, 99]]}, ["layer 2", "[99]", "0..7"], ["repeated"]),
    ({1: [[-1, 3], [1], [2], [4], [5, 6, 7]], 2: GOOD}, ["layer 1", "[-1]", "0..7"], ["missing"]),
    ({1: [[0, 3], [1], [2], [4], [5, 6, 7]], 2: [[0, 3, 8], [1], [2], [4], [5, 6, 7]]}, ["layer 2", "[8]"], []),
    # layers: missing MoE layers and non-MoE layers are named, with the model's MoE layers
    ({1: GOOD}, ["no merge groups for MoE layers [2]", "[1, 2]"], []),
    ({0: GOOD, 1: GOOD, 2: GOOD}, ["layers [0]", "not MoE layers", "[1, 2]"], []),
    ({1: GOOD, 2: GOOD, 7: GOOD}, ["layers [7]", "not MoE layers"], []),
    # the remaining structural checks still apply
    ({1: [[0, 3], [1], [2], [4], [5, 6]], 2: GOOD}, ["layer 1", "missing [7]"], []),
    ({1: [[0, 1, 2, 3, 4, 5, 6, 7]], 2: [[0, 1, 2, 3, 4, 5, 6, 7]]}, ["layer 1", "top-2"], []),
    ({1: GOOD, 2: [[0, 3], [1, 2], [4], [5, 6, 7]]}, ["different expert counts", "{1: 5, 2: 4}"], []),
], ids=["99", "99-extra", "negative", "8", "missing-layer", "dense-layer", "absent-layer", "missing-expert",
        "top-k", "counts"])
def test_merge_plan_validate_names_the_bad_index_and_layers(qwen_adapter, groups, needles, absent):
    with pytest.raises(MoePruneError) as info:
        _plan(groups).validate(qwen_adapter)
    msg = str(info.value)
    assert all(n in msg for n in needles), msg
    assert not any(a in msg for a in absent), msg


def test_merge_plan_for_another_expert_count_is_refused_before_index_checks(qwen_adapter):
    groups = {L: [[j] for j in range(16)] for L in (1, 2)}
    with pytest.raises(MoePruneError, match="made for 16 experts per layer but the model has 8"):
        _plan(groups, 16).validate(qwen_adapter)


def test_merge_plan_file_validated_against_a_checkpoint_names_the_file(tmp_path, capsys):
    ckpt = Checkpoint.open(save_tiny("qwen3_moe", tmp_path / "qwen", seed=1))
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    good, path = _good(), tmp_path / "merge.json"
    path.write_text(json.dumps(good))
    MergePlan.load(path).validate(adapter)  # the valid plan fits
    path.write_text(json.dumps({**good, "groups": {"2": good["groups"]["2"]}, "weights": {"2": GOOD_WEIGHTS}}))
    with pytest.raises(MoePruneError) as info:
        MergePlan.load(path).validate(adapter)
    assert str(path) in str(info.value) and "MoE layers [1]" in str(info.value)
    # through the CLI: exit 2, the file and the bad value named, no traceback, nothing written
    out = tmp_path / "merged"
    path.write_text(json.dumps({**good, "groups": {"1": [[0, 3], [1], [2], [4], [5, 6, "7"]], "2": GOOD_GROUPS}}))
    assert_cli_refused(["apply", ckpt.path, "--plan", path, "--out", out], [re.escape(str(path)), 'member "7"'],
                       capsys, inputs=[ckpt.path, path], out=out)

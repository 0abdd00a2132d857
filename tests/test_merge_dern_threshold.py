"""DERN's threshold chosen from the data (`threshold: auto`, `recombine: ρ`): the recombined fraction against a
brute-force count of cosines, fixed thresholds unchanged (old plans load and replay identically), per-layer
thresholds read by the surgery and the reference (the export verifies), the warning when almost nothing is
recombined, and inapplicable options refused."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

import pytest
import torch

from moeprune import api
from moeprune.calibration.run import CalibrateOptions
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.merge import dern, dern_threshold
from moeprune.merge.dern import merge_dern
from moeprune.merge.methods import MERGES
from moeprune.merge.plan import MergePlan
from moeprune.tiny import save_tiny
from test_merge_grouping import random_expert

I, H = 12, 10
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def layer(seed: int, bias: bool = False) -> tuple[list[dict], list[list[int]]]:
    """8 experts; groups: survivors 0, 2, 4, 6, each with one dropped expert."""
    g = torch.Generator().manual_seed(seed)
    return [random_expert(g, I, H, bias) for _ in range(8)], [[0, 1], [2, 3], [4, 5], [6, 7]]


def brute_force_best(experts, groups) -> torch.Tensor:
    """Best cosine of every dropped neuron (gate row, up row, down column, bias entries) over every survivor
    neuron, by explicit loops over the pairs of neurons."""

    def feature(e, k):
        parts = [e["gate"][k], e["up"][k], e["down"][:, k]]
        parts += [e[b][k : k + 1] for b in ("gate_bias", "up_bias") if b in e]
        return torch.cat(parts)

    best = []
    for d in sorted(j for grp in groups for j in grp[1:]):
        for k in range(I):
            a = feature(experts[d], k)
            best.append(max(float(a @ feature(experts[s], kk) / (a.norm() * feature(experts[s], kk).norm()))
                            for s in (grp[0] for grp in groups) for kk in range(I)))
    return torch.tensor(best, dtype=torch.float64)


def plan_of(groups_by_layer: dict[int, list[list[int]]], **kw) -> MergePlan:
    return MergePlan(groups_by_layer, 8, merge="dern", method="dern", **kw)


@contextmanager
def captured(caplog):
    log = logging.getLogger("moeprune")
    direct = not log.propagate  # the CLI tests may have set propagate=False on it: then attach caplog directly
    if direct:
        log.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="moeprune"):
            yield
    finally:
        if direct:
            log.removeHandler(caplog.handler)


# --------------------------------------------------------------------------------------------- the threshold math


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rho", [0.1, 0.25, 0.5, 0.9, 1.0])
def test_auto_recombines_the_asked_fraction_of_segments(rho, bias):
    layers = {1: layer(1, bias), 2: layer(2, bias)}
    plan = plan_of({k: g for k, (_, g) in layers.items()})
    dern_threshold.resolve(plan, ((k, e) for k, (e, _) in layers.items()), rho, pooled=False)
    assert isinstance(plan.threshold, dict) and sorted(plan.threshold) == [1, 2] and plan.recombine == rho
    for k, (experts, groups) in layers.items():
        best = brute_force_best(experts, groups)  # [4·I]
        want = round(rho * best.numel())
        alpha = plan.threshold[k]
        assert int((best >= alpha).sum()) == want == plan.recombined[k][0] and plan.recombined[k][1] == 4 * I
        # α sits strictly between the last segment taken and the first left (half their gap from each)
        assert -1 <= alpha <= 1 and (best >= alpha).sum() == (best > alpha).sum()
        # the merge with the recorded α moves exactly those segments: survivors change iff something came in
        merged = MERGES.get("dern")(plan)(experts, groups, [[1.0, 1.0]] * 4, layer=k)
        changed = sum(not torch.equal(m["gate"], experts[grp[0]]["gate"])
                      for m, grp in zip(merged, groups, strict=True))
        assert (changed == 0) == (want == 0)


def unread(layers):
    """The layers' (layer, experts) pairs, failing the test if anything asks for one."""
    yield from ()
    raise AssertionError(f"recombine 0 read the weights of layers {sorted(layers)}")


@pytest.mark.parametrize("bias", [False, True])
def test_recombine_zero_reads_no_weights_and_the_merge_keeps_each_survivor(bias, monkeypatch):
    layers = {1: layer(11, bias), 2: layer(12, bias)}
    plan = plan_of({k: g for k, (_, g) in layers.items()})
    dern_threshold.resolve(plan, unread(layers), 0.0)
    assert plan.threshold is None and plan.recombine == 0.0 and plan.recombined is None
    again = MergePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.threshold is None and again.to_dict()["threshold"] is None and again.sha256() == plan.sha256()
    monkeypatch.setattr("moeprune.merge.dern.dern_best", lambda *a: pytest.fail("the merge scanned similarities"))
    for k, (experts, groups) in layers.items():
        merged = MERGES.get("dern")(again)(experts, groups, [[3.0, 1.0]] * 4, layer=k)
        # each group's expert is its survivor, bit for bit (nothing recombined: pruning of the dropped experts)
        assert all(m.keys() == experts[grp[0]].keys() and all(torch.equal(m[r], experts[grp[0]][r]) for r in m)
                   for m, grp in zip(merged, groups, strict=True))
    # null contradicts a recombined fraction or counted segments; it is a dern setting only
    base = again.to_dict()
    for bad, needle in ((dict(recombine=0.25), "asks for 0.25"), (dict(recombined={"1": [3, 48]}), "layers [1]"),
                        (dict(merge="average"), "dern setting")):
        with pytest.raises(MoePruneError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            MergePlan.from_dict({**base, **bad})


def test_similarities_are_scanned_once_per_layer_content(monkeypatch):
    experts, groups = layer(13)
    survivors, dropped = [g[0] for g in groups], [g[1] for g in groups]
    calls = []
    scan = dern.scan_best
    monkeypatch.setattr(dern, "scan_best", lambda *a: calls.append(1) or scan(*a))
    monkeypatch.setattr(dern, "_MEMO", type(dern._MEMO)())
    first = dern.dern_best(experts, survivors, dropped)
    copy = [{r: t.clone() for r, t in e.items()} for e in experts]  # equal content, other tensors
    again = dern.dern_best(copy, survivors, dropped)
    assert len(calls) == 1 and again is first
    narrow = [{r: t.float() for r, t in e.items()} for e in experts]  # other values (float32): scanned
    in32 = dern.dern_best(narrow, survivors, dropped)
    wide = [{r: t.double() for r, t in e.items()} for e in narrow]  # those values in float64: the same entry
    assert dern.dern_best(wide, survivors, dropped) is in32 and len(calls) == 2
    want = brute_force_best(experts, groups)
    torch.testing.assert_close(torch.cat([first[d][0] for d in dropped]), want, rtol=0, atol=1e-12)
    copy[dropped[0]]["up"][0, 0] += 1.0  # one value of one dropped expert: scanned anew, and its result differs
    changed = dern.dern_best(copy, survivors, dropped)
    assert len(calls) == 3 and not torch.equal(changed[dropped[0]][0], first[dropped[0]][0])
    torch.testing.assert_close(torch.cat([changed[d][0] for d in dropped]), brute_force_best(copy, groups), rtol=0,
                               atol=1e-12)
    dern.dern_best(experts, survivors, dropped[:2])  # other dropped experts: another entry
    assert len(calls) == 4


def test_pooled_threshold_recombines_the_fraction_over_all_layers():
    layers = {1: layer(3), 2: layer(4), 3: layer(5)}
    plan = plan_of({k: g for k, (_, g) in layers.items()})
    dern_threshold.resolve(plan, ((k, e) for k, (e, _) in layers.items()), 0.5, pooled=True)
    assert isinstance(plan.threshold, float)
    best = torch.cat([brute_force_best(e, g) for e, g in layers.values()])
    assert int((best >= plan.threshold).sum()) == round(0.5 * best.numel()) == sum(n for n, _ in
                                                                                  plan.recombined.values())


def test_per_layer_thresholds_are_read_per_layer_by_the_merge():
    experts, groups = layer(6)
    weights = [[2.0, 1.0]] * 4
    plan = plan_of({1: groups, 2: groups}, threshold={1: 1.0, 2: -1.0})
    merge = MERGES.get("dern")(plan)
    for k, alpha in ((1, 1.0), (2, -1.0)):
        got, want = merge(experts, groups, weights, layer=k), merge_dern(experts, groups, weights, alpha)
        assert all(torch.equal(a[r], b[r]) for a, b in zip(got, want, strict=True) for r in a)
    pruned = merge(experts, groups, weights, layer=1)  # α = 1: nothing comes in, the survivors stay as they were
    assert all(torch.equal(m["gate"], experts[grp[0]]["gate"]) for m, grp in zip(pruned, groups, strict=True))
    with pytest.raises(MoePruneError, match="layer 3"):
        merge(experts, groups, weights, layer=3)


# --------------------------------------------------------------------------------------------- old plans


def test_old_float_threshold_plan_loads_and_replays_identically(tmp_path):
    experts, groups = layer(7, bias=True)
    weights = [[3.0, 1.0], [1.0, 2.0], [1.0, 1.0], [5.0, 0.0]]
    old = {"format": "moeprune.merge/1", "model_type": "qwen3_moe", "num_experts": 8, "method": "dern",
           "ratio": 0.5, "merge": "dern", "router": "dominant", "rank": None, "threshold": 0.05, "note": None,
           "groups": {"1": groups}, "weights": {"1": weights}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    plan = MergePlan.load(path)
    assert plan.threshold == 0.05 and plan.recombine is None and plan.recombined is None
    assert plan.to_dict() == old  # written back as it was read: no new keys
    # the hash of an old plan is unchanged (same payload as before per-layer thresholds existed)
    import hashlib

    payload = json.dumps({"groups": {"1": groups}, "weights": {"1": weights}, "merge": "dern", "router": "dominant",
                          "rank": None, "threshold": 0.05}, sort_keys=True)
    assert plan.sha256() == hashlib.sha256(payload.encode()).hexdigest()
    got = MERGES.get("dern")(plan)(experts, groups, weights, layer=1)
    want = merge_dern(experts, groups, weights, threshold=0.05)
    assert all(torch.equal(a[r], b[r]) for a, b in zip(got, want, strict=True) for r in b)
    # a plan with neither threshold key nor the new keys keeps the old default cosine 0.4
    del old["threshold"]
    assert MergePlan.from_dict(old).threshold == 0.4


def test_per_layer_threshold_plan_round_trips_and_bad_ones_are_refused():
    experts, groups = layer(8)
    plan = plan_of({1: groups, 2: groups}, threshold={1: 0.1, 2: 0.3}, recombine=0.25,
                   recombined={1: [12, 48], 2: [3, 48]})
    again = MergePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.threshold == {1: 0.1, 2: 0.3} and again.recombined == {1: [12, 48], 2: [3, 48]}
    assert again.recombine == 0.25 and again.sha256() == plan.sha256()
    base = plan.to_dict()
    for bad, needle in ((dict(threshold={"1": 0.1}), "every merged layer"), (dict(threshold={"1": 0.1, "2": 2}),
                                                                               "layer 2"),
                        (dict(threshold={"1": "x", "2": 0.1}), "threshold['1']"), (dict(recombine=1.5), "[0, 1]"),
                        (dict(recombined={"1": [50, 48], "2": [0, 48]}), "recombined[1]"),
                        (dict(recombined={"1": [1.5, 48]}), "two whole"), (dict(threshold="auto"), "'threshold'")):
        with pytest.raises(MoePruneError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            MergePlan.from_dict({**base, **bad})


# --------------------------------------------------------------------------------------------- the warning


def test_warning_when_almost_nothing_is_recombined(caplog):
    layers = {1: layer(9), 2: layer(10)}
    groups = {k: g for k, (_, g) in layers.items()}
    with captured(caplog):
        dern_threshold.resolve(plan_of(groups), ((k, e) for k, (e, _) in layers.items()), 0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "layer 1: 24 of 48 dropped neuron segments recombined" in caplog.text
    for recombine, threshold, fix in ((0.0, 0.4, "set --recombine FRACTION"), (0.01, 0.4, "set --recombine FRACTION"),
                                      (None, 0.99, "--threshold auto")):
        caplog.clear()
        with captured(caplog):
            plan = dern_threshold.resolve(plan_of(groups, threshold=threshold),
                                          ((k, e) for k, (e, _) in layers.items()), recombine)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "plain pruning" in warned[0] and fix in warned[0], warned
        assert (plan.recombined is None) == (recombine == 0)
        assert sum(n for n, _ in (plan.recombined or {}).values()) < 0.05 * 96
    # one layer below 5 %, the other not: still a warning, naming the layer
    plan = plan_of(groups, threshold={1: 1.0, 2: -1.0})
    caplog.clear()
    with captured(caplog):
        dern_threshold.resolve(plan, ((k, e) for k, (e, _) in layers.items()), None)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "layer 1: 0/48" in warned[0] and "layer 2" not in warned[0]


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dern_threshold")
    g = torch.Generator().manual_seed(0)
    (root / "web.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 10, (2500,), generator=g)))
    save_tiny("qwen3_moe", root / "qwen3_moe", seed=1, with_tokenizer=True)
    return root


def calib(root, **kw) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48, held_out=0, **kw)


def test_auto_export_verifies_records_thresholds_and_replays(root, tmp_path, caplog, monkeypatch):
    src = root / "qwen3_moe"
    scans, scan = [], dern.scan_best
    monkeypatch.setattr(dern, "_MEMO", type(dern._MEMO)())
    monkeypatch.setattr(dern, "scan_best", lambda *a: scans.append(1) or scan(*a))
    with captured(caplog):
        applied, result = api.prune(src, tmp_path / "out", method="dern", ratio=0.5, calib=calib(root),
                                    recombine=0.5)
    assert result.passed
    plan = MergePlan.load(tmp_path / "out" / "moeprune_merge.json")
    assert isinstance(plan.threshold, dict) and sorted(plan.threshold) == plan.layers and plan.recombine == 0.5
    assert all(n == round(0.5 * of) and of > 0 for n, of in plan.recombined.values())
    report = json.loads((tmp_path / "out" / "moeprune_report.json").read_text())
    stage = next(s for s in report["stages"] if s["stage"] == "merge")
    assert stage["recombined"] == {str(k): v for k, v in plan.recombined.items()} and stage["recombine"] == 0.5
    assert stage["threshold"] == {str(k): v for k, v in plan.threshold.items()}
    assert "dropped neuron segments recombined" in caplog.text
    # the threshold choice, the export and verify's reference: one similarity scan per layer, not three
    assert len(scans) == len(plan.layers), scans
    # replaying the recorded plan onto the original gives the same export; verify passes on it
    assert main(["apply", str(src), "--plan", str(tmp_path / "out" / "moeprune_merge.json"),
                 "--out", str(tmp_path / "again")]) == 0
    assert main(["verify", str(src), str(tmp_path / "again")]) == 0
    # one decoder layer at a time (lazy): the same similarities, so the same thresholds
    lazy = api.prune(src, tmp_path / "lazy", method="dern", ratio=0.5, calib=calib(root), recombine=0.5,
                     lazy=True)[1]
    assert lazy.passed and MergePlan.load(tmp_path / "lazy" / "moeprune_merge.json").threshold == plan.threshold


def test_default_recombines_nothing_without_a_scan_and_fixed_threshold_warns(root, tmp_path, caplog, monkeypatch):
    src = root / "qwen3_moe"
    with monkeypatch.context() as m:  # the default (recombine 0) computes no similarity, in the plan or the export
        for where in ("moeprune.merge.dern.dern_best", "moeprune.merge.dern_threshold.dern_best"):
            m.setattr(where, lambda *a: pytest.fail("recombine 0 scanned the segment similarities"))
        plan, result = api.prune(src, tmp_path / "a", method="dern", ratio=0.5, calib=calib(root))
    assert plan and result.passed  # the export equals the original with the dropped experts masked
    saved = MergePlan.load(tmp_path / "a" / "moeprune_merge.json")
    assert saved.threshold is None and saved.recombine == dern_threshold.DEFAULT_RECOMBINE == 0.0
    with captured(caplog):
        api.prune(src, tmp_path / "b", method="dern", ratio=0.5, calib=calib(root), threshold=0.999,
                  run_verify=False)
    saved = MergePlan.load(tmp_path / "b" / "moeprune_merge.json")
    assert saved.threshold == 0.999 and saved.recombine is None and saved.recombined is not None
    assert "plain pruning" in caplog.text and "--threshold auto" in caplog.text


def test_inapplicable_options_are_refused(root, tmp_path, capsys):
    src, web = root / "qwen3_moe", f"web={root / 'web.txt'}"
    out = str(tmp_path / "o")
    cases = [
        (["--method", "msmoe", "--recombine", "0.5"], "--recombine"),
        (["--method", "dern", "--threshold", "0.3", "--recombine", "0.5"], "fixes the cosine"),
        (["--method", "dern", "--recombine", "1.5"], "[0, 1]"),
        (["--method", "dern", "--threshold", "1.5"], "[-1, 1]"),
        (["--method", "dern", "--threshold", "often"], "neither a cosine"),
        (["--method", "hcsmoe", "--threshold", "auto"], "--threshold applies to the dern merge"),
    ]
    for extra, needle in cases:
        try:
            code = main(["prune", str(src), "--ratio", "0.5", "--calib", web, "--samples", "6", "--seq-len", "48",
                         *extra, "--out", out])
        except SystemExit as e:  # argparse refuses a --threshold that is no number
            code = e.code
        assert code == 2, extra
        assert needle in capsys.readouterr().err, (extra, needle)
    assert not (tmp_path / "o").exists()
    with pytest.raises(MoePruneError, match="threshold must|'auto'"):
        api.make_plan(tmp_path / "none.safetensors", "dern", 0.5, threshold="automatic")
    # a statistics file holds no weights: a recombined fraction is refused there; the default (recombine nothing)
    # and a fixed cosine still plan, and the default's plan applies to the checkpoint and verifies
    stats = tmp_path / "s.safetensors"
    assert main(["calibrate", str(src), "--calib", web, "--samples", "6", "--seq-len", "48", "--out", str(stats)]) == 0
    with pytest.raises(MoePruneError, match="--threshold COSINE"):
        api.make_plan(stats, "dern", 0.5, recombine=0.25)
    plan = api.make_plan(stats, "dern", 0.5, threshold=0.3)
    assert plan.threshold == 0.3 and plan.recombined is None
    plan = api.make_plan(stats, "dern", 0.5)
    assert plan.threshold is None and plan.recombine == 0.0 and plan.recombined is None
    assert main(["apply", str(src), "--plan", str(plan.save(tmp_path / "p.json")), "--out", str(tmp_path / "x")]) == 0

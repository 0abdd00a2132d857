"""`method: auto` against independent references: its block errors equal a routing written out by hand; its choice
is the lowest cross-fitted NLL recomputed here (each fold's candidates planned from a calibration of the other
folds' windows, each scored by a plain masked whole-model forward on its fold); a judged window never feeds the
statistics of what it judges; the export is the chosen criterion's own plan on every window; and the recipe stage /
CLI flags export, verify and report the choice (inapplicable options refused before work)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moeprune import api
from moeprune.calibration.data import CalibSet
from moeprune.calibration.run import CalibrateOptions, calibrate_model, prepare
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline import auto as pipeline_auto
from moeprune.pipeline.context import StageContext
from moeprune.pipeline.judge import block_errors, everywhere, judged_nll
from moeprune.pipeline.verify import seeded_inputs
from moeprune.select import auto, auto_naee
from moeprune.select.build import build_plan
from moeprune.select.plan import PrunePlan
from moeprune.stages.experts import EXPERTS
from moeprune.tiny import save_tiny, tiny_model
from moeprune.tiny_families import tiny_family_model
from refusal import assert_refused

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
CODE = ["def f(x):", "return x+1", "if a: b()", "for i in range(9):", "print(i)", "x = [1, 2]"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    g = torch.Generator().manual_seed(0)
    (root / "web.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 10, (1500,), generator=g)))
    (root / "code.txt").write_text("\n".join(CODE[int(i)] for i in torch.randint(0, 6, (700,), generator=g)))
    save_tiny("qwen3_moe", root / "qwen3_moe", seed=3, with_tokenizer=True)
    return root


def calib(root, **kw) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}", f"code={root / 'code.txt'}"), samples=8, seq_len=32,
                            held_out=2, **kw)


# ---------------------------------------------------------------------------------------------- block error
def hand_block(block, x: torch.Tensor, drop: list[int]) -> torch.Tensor:
    """Qwen3-MoE's block written out: logits of dropped experts -inf, softmax, top-k, renormalised, SwiGLU experts."""
    k = block.gate.top_k
    logits = x @ block.gate.weight.T  # [T, E]
    logits[:, drop] = float("-inf")
    w, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)  # [T, k]
    w = w / w.sum(-1, keepdim=True)
    gate, up = torch.einsum("th,eih->tei", x, block.experts.gate_up_proj).chunk(2, dim=-1)  # [T, E, I] each
    y = torch.einsum("tei,ehi->teh", F.silu(gate) * up, block.experts.down_proj)  # [T, E, H]
    return (y.gather(1, idx[..., None].expand(-1, -1, y.shape[-1])) * w[..., None]).sum(1)  # [T, H]


@torch.no_grad()
def test_block_error_equals_a_routing_written_by_hand():
    model = tiny_model("qwen3_moe", seed=5, num_hidden_layers=3)
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(96, batch=3, seq_len=16, seed=2)  # the last row is padded
    data = CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)
    candidates = {"a": {1: [0, 3], 2: [5, 6]}, "b": {1: [1, 2], 2: [0, 7]}}
    got = block_errors(model, adapter, [data], {c: everywhere(d, [data]) for c, d in candidates.items()},
                       batch_size=2)
    io = {}
    hooks = [adapter.block(model, layer).register_forward_hook(
        lambda m, a, o, layer=layer: io.update({layer: (a[0].detach(), o.detach())})) for layer in (1, 2)]
    model(**inputs, use_cache=False)
    for h in hooks:
        h.remove()
    real = inputs["attention_mask"].bool().reshape(-1)  # [T]
    assert not real.all()
    for layer in (1, 2):
        block = adapter.block(model, layer)
        x, y = (t.reshape(-1, t.shape[-1]).double() for t in io[layer])  # [T, H]
        block.double()
        assert torch.allclose(hand_block(block, x, []), y, atol=1e-5)  # the reference is the block
        for name, drops in candidates.items():
            ref = (y - hand_block(block, x, drops[layer]))[real].square().sum() / y[real].square().sum()
            err = got.num[name][layer]["s"] / got.den[layer]["s"]
            assert err == pytest.approx(float(ref), rel=1e-4), (name, layer)
            assert got.error(name, {"s": ["s"]})[layer] == pytest.approx(err, rel=1e-12)
        block.float()
    ea, eb = (got.num[c][1]["s"] / got.den[1]["s"] for c in "ab")
    assert ea > 1e-3 and ea != pytest.approx(eb, rel=1e-2)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm_moe_dsa", "llama4_text"])
def test_judged_nll_is_the_masked_whole_model_forward(family):
    """Layer by layer with the masks, then the model's own head: equal to one whole-model forward with the same
    masks, also where decoder layers return tuples the model unpacks (DSA) or passes on whole (Llama-4)."""
    model = tiny_family_model(family, seed=2) if family != "qwen3_moe" else tiny_model(family, seed=2)
    adapter = get_adapter(model.config, model=model)
    inputs = seeded_inputs(96, batch=3, seq_len=16, seed=4)
    data = CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)
    drops = {layer: [0, 5] for layer in adapter.moe_layers()}
    got = judged_nll(model, adapter, [data], {"none": everywhere({}, [data]), "x": everywhere(drops, [data])},
                     batch_size=2)
    for name, dropped in (("none", {}), ("x", drops)):
        ref = masked_nll(model, adapter, dropped, [(inputs["input_ids"], inputs["attention_mask"])])
        assert got[name].mean()[0] == pytest.approx(ref, rel=1e-5), name
    assert abs(got["x"].mean()[0] - got["none"].mean()[0]) > 1e-4  # the masks matter (well above the tolerance)


# ---------------------------------------------------------------------------------------------- the choice
FOLDS = 4


def folds(n: int) -> list[int]:
    """Fold of each of a set's n windows, written here: min(4, n) contiguous blocks."""
    k = min(FOLDS, n)
    return [w * k // n for w in range(n)]


def fold_windows(sets) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """{(set, fold k): its windows (ids, mask)}."""
    out = {}
    for s in sets:
        of = torch.tensor(folds(s.input_ids.shape[0]))
        for k in sorted(set(of.tolist())):
            out[s.name, k] = (s.input_ids[of == k], s.attention_mask[of == k])
    return out


def without(sets, k: int):
    """Each set without its fold-k windows (the statistics fold k's candidates are planned from)."""
    out = []
    for s in sets:
        keep = torch.tensor(folds(s.input_ids.shape[0])) != k
        out.append(dataclasses.replace(s, input_ids=s.input_ids[keep], attention_mask=s.attention_mask[keep]))
    return out


@torch.no_grad()
def masked_nll(model, adapter, dropped: dict[int, list[int]], windows) -> float:
    """Mean over sets of the per-token NLL of the masked model (a plain whole-model forward per set)."""
    per_set = []
    with masked_experts(model, adapter, dropped):
        for ids, mask in windows:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()  # [B, L, V]
            counted = (mask[:, :-1] * mask[:, 1:]).bool()  # [B, L-1]
            per_set.append(float(F.cross_entropy(logits[:, :-1][counted], ids[:, 1:][counted])))
    return sum(per_set) / len(per_set)


def cross_fitted(model, adapter, opts, sets, names, dropped_by_fold, sets_of=None) -> dict[str, float]:
    """{candidate: mean over sets of its per-token NLL over the counted folds, each fold's windows scored with that
    fold's drops}: plain masked whole-model forwards, summed here."""
    windows = fold_windows(sets)
    out = {}
    for c in names:
        per_set = []
        for s in sets:
            nll = count = 0.0
            for (name, k), (ids, mask) in windows.items():
                if name != s.name or (sets_of is not None and k not in sets_of[name]):
                    continue
                with masked_experts(model, adapter, dropped_by_fold[c][k]), torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
                counted = (mask[:, :-1] * mask[:, 1:]).bool()  # [B, L-1]
                nll += float(F.cross_entropy(logits[:, :-1][counted], ids[:, 1:][counted], reduction="sum"))
                count += int(counted.sum())
            per_set.append(nll / count)
        out[c] = sum(per_set) / len(per_set)
    return out


def test_auto_chooses_the_lowest_cross_fitted_nll_and_exports(root, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {method: auto, ratio: 0.25, auto_naee: false}\n")
    flags = ["--calib", f"web={root / 'web.txt'}", "--calib", f"code={root / 'code.txt'}", "--samples", "8",
             "--seq-len", "32", "--held-out", "2"]
    out = tmp_path / "out"
    assert main(["prune", str(root / "qwen3_moe"), "--recipe", str(recipe), *flags, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "moeprune_report.json").read_text())
    section = report["auto"]
    assert report["verify"]["passed"] and f"auto chose {section['chosen']}" in printed
    plan = PrunePlan.load(out / "moeprune_plans" / "1-experts.json")
    assert plan.auto == section and plan.method == section["chosen"]
    model = load_model(root / "qwen3_moe", dtype="float32")
    adapter = get_adapter(model.config, model=model)
    opts = calib(root)
    _, _, sets = prepare(root / "qwen3_moe", opts)
    assert section["judge"]["windows"] == {s.name: s.input_ids.shape[0] for s in sets}
    assert section["judge"]["folds"] == FOLDS
    # each fold's candidates, planned here from a calibration of the other folds' windows
    criteria = auto.calibrated_criteria()
    by_fold = {}
    for k in range(FOLDS):
        stats = calibrate_model(model, without(sets, k), opts, source=root / "qwen3_moe")
        by_fold[k] = {c: (p := build_plan(stats, c, 0.25)) and {m: p.dropped(m) for m in p.layers} for c in criteria}
    dropped_by_fold = {c: {k: by_fold[k][c] for k in range(FOLDS)} for c in criteria}
    # ... and the exports: each criterion planned from a calibration of every window
    full = calibrate_model(model, sets, opts, source=root / "qwen3_moe")
    final = {c: {m: (p := build_plan(full, c, 0.25)).dropped(m) for m in p.layers} for c in criteria}
    exported = {c: dict.fromkeys(range(FOLDS), final[c]) for c in criteria}
    names = [r["candidate"] for r in section["ranking"]]
    cross = cross_fitted(model, adapter, opts, sets, names, dropped_by_fold)
    inside = cross_fitted(model, adapter, opts, sets, names, exported)
    nll = {c: 0.5 * (cross[c] + inside[c]) for c in names}
    for r in section["ranking"]:  # every distinct candidate: the mean of cross-fitted and in-sample NLL
        assert r["nll"] == pytest.approx(nll[r["candidate"]], rel=1e-5), r["candidate"]
        entry = section["candidates"][r["candidate"]]
        assert entry["nll_cross_fitted"] == pytest.approx(cross[r["candidate"]], rel=1e-5)
        assert entry["nll_in_sample"] == pytest.approx(inside[r["candidate"]], rel=1e-5)
    base = cross_fitted(model, adapter, opts, sets, ["none"], {"none": dict.fromkeys(range(FOLDS), {})})["none"]
    assert section["original_nll"] == pytest.approx(base, rel=1e-5)
    assert len(nll) >= 3 and len({round(v, 6) for v in nll.values()}) > 1
    best = min(nll, key=nll.get)
    # the per-layer composition: each layer's lowest block error on the first half of the folds, preferred to the
    # best single candidate only by the NLL on the other half
    first = section["per_layer"]["block_error_first_half"]
    for layer, name in section["per_layer"]["layers"].items():
        assert first[name][layer] == min(e[layer] for e in first.values())
    expected = best
    assert auto.PER_LAYER in section["candidates"]  # this data composes one (else the branch below goes untested)
    layers = {int(m): c for m, c in section["per_layer"]["layers"].items()}
    composed = {k: {m: dropped_by_fold[c][k][m] for m, c in layers.items()} for k in range(FOLDS)}
    b_folds = {s.name: {2, 3} for s in sets}
    half_cross = cross_fitted(model, adapter, opts, sets, [auto.PER_LAYER, best],
                              {auto.PER_LAYER: composed, best: dropped_by_fold[best]}, sets_of=b_folds)
    composed_export = {m: final[c][m] for m, c in layers.items()}
    half_in = cross_fitted(model, adapter, opts, sets, [auto.PER_LAYER, best],
                           {auto.PER_LAYER: dict.fromkeys(range(FOLDS), composed_export), best: exported[best]},
                           sets_of=b_folds)
    half = {c: 0.5 * (half_cross[c] + half_in[c]) for c in half_cross}
    assert section["per_layer"]["nll_second_half"] == pytest.approx(half, rel=1e-5)
    expected = auto.PER_LAYER if half[auto.PER_LAYER] < half[best] else best
    assert section["chosen"] == expected and plan.method == expected
    # the export is the chosen criterion's own plan on every window (as `--method <it>` would plan)
    want = ({m: final[c][m] for m, c in layers.items()} if expected == auto.PER_LAYER else final[expected])
    assert plan.kept_experts == {m: [j for j in range(8) if j not in v] for m, v in want.items()}
    if expected == best:
        assert section["margin_nll"] == pytest.approx(sorted(nll.values())[1] - nll[best], rel=1e-4, abs=1e-9)


def test_lazy_judges_the_same(root, tmp_path):
    got = {}
    for lazy in (False, True):
        applied, _ = api.prune(root / "qwen3_moe", tmp_path / str(lazy), method="auto", ratio=0.25,
                               calib=calib(root), lazy=lazy, run_verify=False)
        got[lazy] = applied.report["auto"]
    assert got[True]["chosen"] == got[False]["chosen"]
    for a, b in zip(got[True]["ranking"], got[False]["ranking"], strict=True):
        assert a["candidate"] == b["candidate"] and a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def test_a_judged_window_never_feeds_what_it_judges(root, monkeypatch):
    """The statistics each set of candidates is planned from equal a calibration, run here, of exactly the windows
    outside the fold they are judged on; the export's statistics are those of every window."""
    opts = calib(root)
    ckpt = Checkpoint.open(root / "qwen3_moe")
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    _, _, sets = prepare(root / "qwen3_moe", opts)
    seen = []
    real = pipeline_auto.criterion_candidates
    monkeypatch.setattr(pipeline_auto, "criterion_candidates", lambda st, *a: seen.append(st) or real(st, *a))
    ctx = StageContext(ckpt, adapter, [], opts, sets)
    EXPERTS.plan(EXPERTS.parse({"method": "auto", "ratio": 0.25, "auto_naee": False}, "test"), ctx)
    model = load_model(root / "qwen3_moe", dtype="float32")
    refs = [calibrate_model(model, sets, opts, source=root / "qwen3_moe")]
    refs += [calibrate_model(model, without(sets, k), opts, source=root / "qwen3_moe") for k in range(FOLDS)]
    assert len(seen) == 1 + FOLDS
    for got, ref in zip([ctx.stats[0], *seen[1:]], refs, strict=True):
        assert got.sets.keys() == ref.sets.keys() == {"web", "code"}
        for name, per in ref.sets.items():
            for layer, rs in per.items():
                for f, t in rs.sums.items():
                    got_f = got.sets[name][layer].sums[f]  # float32 expert math batched differently: loose
                    assert torch.allclose(got_f, t, rtol=1e-4, atol=1e-5), (name, layer, f)
    assert seen[0] is ctx.stats[0]
    tokens = [int(st.sets["web"][1].sums["tokens"]) for st in refs]
    assert all(t < tokens[0] for t in tokens[1:])  # each fold's statistics lack its windows


# ---------------------------------------------------------------------------------------------- options
def test_naee_candidate_when_affordable_and_recorded_when_skipped(root, tmp_path, monkeypatch):
    applied, _ = api.prune(root / "qwen3_moe", tmp_path / "a", method="auto", ratio=0.25, calib=calib(root),
                           run_verify=False)
    naee = applied.report["auto"]["naee"]
    assert naee["included"] and "naee_reconstruction" in applied.report["auto"]["candidates"]
    assert naee["evaluations_per_layer"] == math.comb(8, 2)
    monkeypatch.setattr(auto_naee, "NAEE_BUDGET", naee["cost"] - 1)
    applied, _ = api.prune(root / "qwen3_moe", tmp_path / "b", method="auto", ratio=0.25, calib=calib(root),
                           run_verify=False)
    naee = applied.report["auto"]["naee"]
    assert not naee["included"] and "not affordable" in naee["reason"]
    assert "naee_reconstruction" not in applied.report["auto"]["candidates"]
    applied, _ = api.prune(root / "qwen3_moe", tmp_path / "c", method="auto", ratio=0.25, calib=calib(root),
                           run_verify=False, auto_naee=True)  # forced: included whatever the budget
    assert applied.report["auto"]["naee"]["included"]


def test_inapplicable_options_are_refused_before_work(root, tmp_path, no_work):
    src, out = root / "qwen3_moe", tmp_path / "out"
    cases = [
        ({"method": "reap", "nll_candidates": 2}, r"--nll-candidates only applies to method 'auto'"),
        ({"method": "naee", "auto_naee": True, "judge_folds": 2}, r"--auto-naee, --judge-folds only apply"),
        ({"method": "auto", "seed": 1}, r"--seed does not apply to method 'auto'"),
        ({"method": "auto", "policy": "global", "floor": 4}, r"--policy global, --floor do not apply"),
        ({"method": "auto", "as_you_go": True}, r"--as-you-go does not apply"),
        ({"method": "auto", "calib_set": ["web"]}, r"--calib-set does not apply"),
        ({"method": "auto", "auto_naee": False, "beam": 2}, r"beam configures NAEE's candidate"),
        ({"method": "auto", "judge_folds": 1}, r"judge_folds must be an integer >= 2"),
        ({"method": "auto", "auto_naee": "yes"}, r"auto_naee is true"),
    ]
    for stage, match in cases:
        recipe = [{"ratio": 0.25, **stage}]
        assert_refused(lambda r=recipe: api.prune(src, out, r, calib=calib(root)), match, inputs=[src], out=out)
    assert_refused(lambda: api.prune(src, out, [{"method": "auto", "ratio": 0.25}]), r"needs calibration data",
                   inputs=[src], out=out)
    for argv in (["--method", "auto", "--ratio", "0.25", "--seed", "3"],
                 ["--method", "tcess", "--ratio", "0.25", "--no-auto-naee"]):
        assert main(["prune", str(src), *argv, "--calib", f"web={root / 'web.txt'}", "--out", str(out)]) == 2


def test_auto_cannot_plan_from_statistics(root, tmp_path):
    stats = api.calibrate(root / "qwen3_moe", calib(root))
    for source in (stats, root / "qwen3_moe"):
        with pytest.raises(MoePruneError, match="which `moeprune plan` does not run"):
            api.make_plan(source, "auto", 0.25)


def test_plans_without_an_auto_section_still_load(tmp_path):
    raw = {"format": "moeprune.plan/1", "num_experts": 8, "method": "reap", "ratio": 0.25,
           "kept_experts": {"1": [0, 1, 2, 3, 4, 5]}}
    plan = PrunePlan.from_dict(raw)
    assert plan.auto is None and "auto" not in plan.to_dict()
    plan.auto = {"chosen": "reap"}
    assert PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict()))).auto == {"chosen": "reap"}


def test_too_few_windows_to_judge_is_refused(root, tmp_path):
    opts = CalibrateOptions((f"web={root / 'web.txt'}",), samples=1, seq_len=32, held_out=0)
    with pytest.raises(MoePruneError, match=r"'web' has 1 window\(s\).*needs at least 2"):
        api.prune(root / "qwen3_moe", tmp_path / "o", method="auto", ratio=0.25, calib=opts)


def test_a_composition_that_takes_naee_in_one_layer_is_reported_then_exported():
    """Layer 1 is best with reap, layer 2 with NAEE (block errors on fold A); the composition wins on fold B (mean of
    cross-fitted and in-sample NLL); while a composed candidate's export is missing, the report omits its drops."""
    from moeprune.pipeline.judge import BlockErrors, WindowNLL

    naee = auto_naee.NAEE_NAME
    where = {"s#0": ("s", 0), "s#1": ("s", 1)}
    both = lambda d: {"s#0": d, "s#1": d}  # noqa: E731
    j = auto.Judgement(drops={"reap": {1: [0], 2: [0]}},
                       fold_drops={"reap": both({1: [0], 2: [0]}), naee: both({1: [1], 2: [1]})}, where=where)
    j.errors = BlockErrors({"reap": {1: both(1.0), 2: both(3.0)}, naee: {1: both(2.0), 2: both(1.0)}},
                           {1: both(10.0), 2: both(10.0)})
    j.compose_layers([1, 2])
    assert j.best_by_layer == {1: "reap", 2: naee} and j.composite
    assert j.composed_folds == both({1: [0], 2: [1]})
    nll = lambda a, b: WindowNLL({"s#0": torch.tensor([a]), "s#1": torch.tensor([b])},  # noqa: E731
                                 {"s#0": torch.tensor([10]), "s#1": torch.tensor([10])})
    j.judged = ["reap", naee]
    j.nll = {"original": nll(10.0, 10.0), "reap": nll(20.0, 20.0), naee: nll(30.0, 30.0),
             auto.PER_LAYER: nll(40.0, 15.0)}
    j.nll |= {c + auto.IN_SAMPLE: nll(a, b) for c, (a, b) in
              {"reap": (20.0, 22.0), naee: (26.0, 26.0), auto.PER_LAYER: (40.0, 13.0)}.items()}
    section = j.section({"included": True}, 2, {"s": 2}, 20)
    assert section["per_layer"]["nll_second_half"] == {auto.PER_LAYER: 1.4, "reap": 2.1}  # ½(cross + in) on fold 1
    assert [r["candidate"] for r in section["ranking"]] == ["reap", naee]  # ½(2.0 + 2.1) < ½(3.0 + 2.6)
    assert section["chosen"] == auto.PER_LAYER and section["runner_up"] == "reap"
    assert "dropped" not in section["candidates"][auto.PER_LAYER] and j.composed() is None
    j.drops[naee] = {1: [2], 2: [3]}  # NAEE's own plan on every window
    assert j.composed() == {1: [0], 2: [3]}


def test_prune_without_a_method_is_auto_with_calibration_and_refused_without(root, tmp_path, capsys):
    src = root / "qwen3_moe"
    flags = ["--calib", f"web={root / 'web.txt'}", "--calib", f"code={root / 'code.txt'}", "--samples", "8",
             "--seq-len", "32", "--held-out", "2", "--ratio", "0.25", "--no-verify"]
    assert main(["prune", str(src), *flags, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "moeprune_report.json").read_text())
    assert f"auto chose {report['auto']['chosen']}" in capsys.readouterr().out
    assert main(["prune", str(src), "--ratio", "0.25", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "no --method given" in err and "--calib" in err and not (tmp_path / "b").exists()

"""`moeprune analyze` against independent references: routing traces equal a plain whole-model forward's routing,
the measured probe equals the block run by hand with the experts masked, usage equals counts / tokens, SRP/SCH and
baselines equal `analysis.lrc` on the traces; every part of analysis.json has the right shape; the statistics-file
mode says what it cannot do; bad input is refused before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprune.analysis import run as analysis_run
from moeprune.analysis.locality import MAX_TOKENS, N_SHUFFLES, budget
from moeprune.analysis.lrc import sch, srp, srp_sch_baseline
from moeprune.analysis.run import analyze, analyze_sets, analyze_stats
from moeprune.calibration import run as calib_run
from moeprune.calibration.data import CalibSet
from moeprune.calibration.run import CalibrateOptions
from moeprune.cli import main
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import seeded_inputs
from moeprune.stats.store import ExpertStats
from moeprune.tiny import save_tiny, tiny_model
from refusal import assert_cli_refused

FAMILIES = ["qwen3_moe", "deepseek_v3"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    g = torch.Generator().manual_seed(0)
    (root / "web.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 10, (900,), generator=g)))
    (root / "code.txt").write_text("\n".join(f"def f{i}(x): return x * {i} - 3" for i in range(60)))
    return root


def calib(root: Path, **kw) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}", f"code={root / 'code.txt'}"),
                            samples=kw.pop("samples", 4), seq_len=kw.pop("seq_len", 32), batch_size=3, **kw)


@pytest.fixture(scope="module")
def ckpts(root) -> dict[str, Path]:
    return {f: save_tiny(f, root / f, seed=1, with_tokenizer=True) for f in FAMILIES}


@pytest.fixture(scope="module")
def runs(root, ckpts) -> dict[str, analysis_run.AnalysisResult]:
    """The end-to-end analysis of both tiny models on two text domains (default ratios and lengths)."""
    return {f: analyze(ckpts[f], calib(root), root / f"out_{f}") for f in FAMILIES}


@pytest.fixture(scope="module")
def padded() -> dict[str, tuple]:
    """analyze_sets on two seeded sets with left padding, 2 rows per batch: (model, adapter, sets, result)."""
    out = {}
    for f in FAMILIES:
        model = tiny_model(f, seed=2)
        adapter = get_adapter(model.config)
        sets = [CalibSet(name, *seeded_inputs(96, batch=3, seq_len=20, seed=s).values(), "-", "-", 1, 1)
                for name, s in (("a", 4), ("b", 5))]
        out[f] = (model, adapter, sets, analyze_sets(model, adapter, sets, batch_size=2, lengths=(4, 8)))
    return out


# ------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_every_part_has_the_right_shape(runs, family):
    res = runs[family]
    out = res.out_dir
    a = json.loads((out / "analysis.json").read_text())
    L, E, k, D = len(a["layers"]), a["num_experts"], a["top_k"], a["domains"]
    assert a["layers"] == res.stats.layers and D == ["web", "code"] and (E, k) == (8, 2)

    def shape(x, *dims):
        assert len(x) == dims[0], (len(x), dims)
        for item in x:
            if len(dims) > 1:
                shape(item, *dims[1:])

    for m in [a["usage"]["all"], *a["usage"]["per_domain"].values()]:
        shape(m, L, E)
    for v in [a["balance"]["all"], *a["balance"]["per_domain"].values()]:
        for key in ("entropy_bits", "entropy_normalized", "cv"):
            shape(v[key], L)
    spec = a["specialisation"]
    shape(spec["per_expert"], L, E)
    shape(spec["owner"], L, E)
    assert len(spec["layer"]) == L and {o for row in spec["owner"] for o in row} <= {*D, None}
    for i in range(L):  # every used expert has exactly one owner
        assert sorted(e for d in D for e in spec["owned"][d][i]) == [e for e in range(E) if spec["owner"][i][e]]
    lift = a["coactivation"]["lift"]
    shape(lift, L, E, E)
    for m in lift:
        assert all(m[e][e] is None for e in range(E))
        assert all(m[i][j] == m[j][i] for i in range(E) for j in range(E))
    shape(a["super_experts"]["max_abs"], L, E)
    assert len(a["super_experts"]["experts"]) == L
    p = a["probe"]
    R = len(p["ratios"])
    usable = [0.1, 0.25, 0.5, 0.75] if family == "qwen3_moe" else [0.25, 0.5]  # deepseek: 2 groups of 4, ≥ 2 each
    assert p["ratios"] == usable and len(p.get("skipped_ratios", {})) == 4 - len(usable)
    for key in ("predicted", "measured"):
        shape(p[key], L, R)
        assert all(0 <= v <= 1.5 for row in p[key] for v in row)
    for d in D:
        shape(p["measured_per_domain"][d], L, R)
        shape(p["predicted_per_domain"][d], L, R)
    for i in range(L):
        assert [len(d) for d in p["dropped"][i]] == [round(r * E) for r in usable]
        assert p["predicted"][i] == sorted(p["predicted"][i])  # more dropped, more mass removed
    assert len(p["cliff"]) == L and all(c is None or c in usable for c in p["cliff"])
    assert [g["ratio"] for g in a["agreement"]] == usable
    for g in a["agreement"]:
        M = len(g["methods"])
        shape(g["matrix"], M, M)
        assert "random" in g["methods"] and all(g["matrix"][i][i] == 1 for i in range(M))
    loc = a["locality"]
    assert loc["lengths"] == [4, 16] and loc["skipped_lengths"].keys() == {"64", "256"}  # sequences of 32
    assert loc["cache_sizes"] == [2, 4]
    for key in ("srp", "srp_baseline", "srp_global"):
        shape(loc[key], L, 2)
    for key in ("sch", "sch_baseline", "sch_global"):
        shape(loc[key], L, 2, 2)
    assert loc["verdict"]["kind"] in ("dynamic", "per-sequence", "static")
    assert "SCH(L=16, m=4)" in loc["verdict"]["text"]
    # files: valid PNGs, the statistics of the pass, the report for the renderer
    assert set(a["files"]) == {"usage", "balance", "coactivation", "super_experts", "agreement", "probe", "locality",
                               "stats"}
    for key, name in a["files"].items():
        if key != "stats":
            assert (out / name).read_bytes()[:8] == PNG, name
    import matplotlib.image

    assert matplotlib.image.imread(out / "usage.png").ndim == 3
    saved = ExpertStats.load(out / "stats.safetensors")
    first = a["layers"][0]
    assert torch.equal(saved.sets["web"][first].sums["count"], res.stats.sets["web"][first].sums["count"])
    check_report(json.loads((out / "report.json").read_text()), out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary folder left


def check_report(report: dict, out: Path) -> None:
    """The renderer's contract: title, subtitle, sections with id/title/paragraphs/images/tables, files exist."""
    assert isinstance(report["title"], str) and isinstance(report["subtitle"], str)
    ids = [s["id"] for s in report["sections"]]
    assert len(ids) == len(set(ids)) and "probe" in ids and "locality" in ids
    for s in report["sections"]:
        assert set(s) == {"id", "title", "paragraphs", "images", "tables"}
        assert all(isinstance(p, str) for p in s["paragraphs"])
        for img in s["images"]:
            assert (out / img["file"]).is_file() and isinstance(img["caption"], str)
        for t in s["tables"]:
            assert isinstance(t["caption"], str)
            for row in t["rows"]:
                assert len(row) == len(t["columns"]) and all(isinstance(v, (str, int, float)) for v in row)


def test_usage_equals_counts_over_tokens(runs):
    res = runs["qwen3_moe"]
    a = json.loads((res.out_dir / "analysis.json").read_text())
    for name, m in a["usage"]["per_domain"].items():
        for i, layer in enumerate(a["layers"]):
            s = res.stats.sets[name][layer].sums
            want = (s["count"] / s["tokens"]).tolist()
            assert m[i] == pytest.approx(want, rel=1e-12) and sum(m[i]) == pytest.approx(a["top_k"])


# ------------------------------------------------------------------------------------------ references


def whole_model_routing(model, adapter, inputs) -> dict[int, torch.Tensor]:
    """{layer: top_k_index [B·S, k]} of one plain whole-model forward (hooks on the experts' inputs)."""
    seen, hooks = {}, []
    for layer in adapter.moe_layers():
        experts = adapter.experts(adapter.block(model, layer))
        hooks.append(experts.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a[1].clone())))
    with torch.no_grad():
        model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_traces_equal_whole_model_routing(padded, family):
    model, adapter, sets, res = padded[family]
    for s in sets:
        routed = whole_model_routing(model, adapter, s)
        mask = s.attention_mask.bool()  # [B, S]; the last row is left-padded
        for layer in adapter.moe_layers():
            idx = routed[layer].view(*mask.shape, -1)  # [B, S, k]
            want = [idx[b][mask[b]] for b in range(mask.shape[0])]
            got = res.traces[s.name][layer]
            assert len(got) == len(want) and got[-1].shape[0] < s.input_ids.shape[1]
            for g, w in zip(got, want, strict=True):
                assert g.dtype == torch.int64 and torch.equal(g, w)
            counts = torch.bincount(torch.cat(got).flatten(), minlength=adapter.num_experts).double()
            assert torch.equal(counts, res.stats.sets[s.name][layer].sums["count"])


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_probe_equals_direct_computation(padded, family):
    """Every layer and ratio: the experts with the least Σ g‖f‖ (per group) are dropped, and the measured error is
    ‖Z − block_masked(X)‖² / ‖Z‖² on real tokens, with X, Z from a whole-model forward and the block run by hand."""
    model, adapter, sets, res = padded[family]
    p, layers = res.data["probe"], res.data["layers"]
    routing = adapter.routing()
    groups = routing.n_group if routing.group_limited else 1
    size = adapter.num_experts // groups
    io: dict[str, dict[int, tuple]] = {}
    for s in sets:
        io[s.name], hooks = {}, []
        for layer in layers:
            hooks.append(adapter.block(model, layer).register_forward_hook(
                lambda m, a, o, layer=layer, name=s.name: io[name].__setitem__(
                    layer, (a[0].clone(), (o[0] if isinstance(o, tuple) else o).clone()))))
        with torch.no_grad():
            model(input_ids=s.input_ids, attention_mask=s.attention_mask, use_cache=False)
        for h in hooks:
            h.remove()
    for i, layer in enumerate(layers):
        mass = sum(res.stats.sets[s.name][layer].sums["gate_norm_sum"] for s in sets)  # [E]
        for j in range(len(p["ratios"])):
            dropped = p["dropped"][i][j]
            for g in range(groups):  # the lightest experts of every group, the same number in each
                mine = [e for e in range(g * size, (g + 1) * size)]
                gone = [e for e in mine if e in dropped]
                assert len(gone) == len(dropped) // groups
                assert max(mass[e] for e in gone) <= min(mass[e] for e in mine if e not in gone)
            assert p["predicted"][i][j] == pytest.approx(float(mass[dropped].sum() / mass.sum()), rel=1e-12)
            err = ref = 0.0
            for s in sets:
                x, z = io[s.name][layer]  # [B, S, H]
                with torch.no_grad(), masked_experts(model, adapter, {layer: dropped}):
                    out = adapter.block(model, layer)(x)
                out = out[0] if isinstance(out, tuple) else out
                keep = s.attention_mask.bool()
                e_s = float((z[keep].double() - out[keep].double()).square().sum())
                r_s = float(z[keep].double().square().sum())
                assert p["measured_per_domain"][s.name][i][j] == pytest.approx(e_s / r_s, rel=1e-4, abs=1e-9)
                err, ref = err + e_s, ref + r_s
            assert p["measured"][i][j] == pytest.approx(err / ref, rel=1e-4, abs=1e-9)
            assert err > 0


def test_locality_equals_lrc_on_the_traces(padded):
    _, adapter, sets, res = padded["qwen3_moe"]
    loc, E = res.data["locality"], adapter.num_experts
    assert loc["lengths"] == [4, 8] and loc["cache_sizes"] == [2, 4]
    assert loc["tokens"] == sum(int(s.attention_mask.sum()) for s in sets)  # under the budget: every token
    for i, layer in enumerate(res.data["layers"]):
        traces = budget([res.traces[s.name][layer] for s in sets], MAX_TOKENS)  # a, b, a, b, ... sequences
        for n, L in enumerate(loc["lengths"]):
            assert loc["srp"][i][n] == pytest.approx(srp(traces, E, L), rel=1e-12)
            for j, m in enumerate(loc["cache_sizes"]):
                assert loc["sch"][i][n][j] == pytest.approx(sch(traces, E, L, m), rel=1e-12)
                base = srp_sch_baseline(traces, E, L, m, n_shuffles=N_SHUFFLES)
                glob = srp_sch_baseline(traces, E, L, m, n_shuffles=N_SHUFFLES, across_sequences=True)
                assert (loc["srp_baseline"][i][n], loc["sch_baseline"][i][n][j]) == pytest.approx(base, rel=1e-12)
                assert (loc["srp_global"][i][n], loc["sch_global"][i][n][j]) == pytest.approx(glob, rel=1e-12)
        counts = res.stats.combined()[layer].sums["count"].sort(descending=True).values
        assert loc["static"][i] == pytest.approx([float(counts[:m].sum() / counts.sum()) for m in (2, 4)])
    v = loc["verdict"]
    assert v["length"] == 8 and v["cache_size"] == 4  # closest length to 16; m = 2k
    assert v["gain"] == pytest.approx(sum(v["sch"]) / len(v["sch"]) - sum(v["baseline"]) / len(v["baseline"]))


def test_token_budget_takes_whole_sequences_round_robin():
    a = [torch.zeros(n, 2, dtype=torch.long) for n in (5, 6, 7)]
    b = [torch.ones(n, 2, dtype=torch.long) for n in (3, 4)]
    assert [t.shape[0] for t in budget([a, b], 100)] == [5, 3, 6, 4, 7]
    assert [t.shape[0] for t in budget([a, b], 14)] == [5, 3, 6]
    assert [t.shape[0] for t in budget([a, b], 1)] == [5]  # never empty


def test_one_domain_skips_specialisation(padded, tmp_path):
    model, adapter, sets, _ = padded["qwen3_moe"]
    res = analyze_sets(model, adapter, sets[:1], ratios=(0.5,), lengths=(4,))
    analysis_run.write(res, tmp_path / "one", stats_file=False)
    a = json.loads((tmp_path / "one" / "analysis.json").read_text())
    assert "two or more --calib" in a["specialisation"]["skipped"] and a["domains"] == ["a"]
    assert a["probe"]["measured"] and a["locality"]["lengths"] == [4]
    check_report(json.loads((tmp_path / "one" / "report.json").read_text()), tmp_path / "one")


# ------------------------------------------------------------------------------------------ stats-file mode


def test_analyze_stats_says_what_it_cannot_do(runs, tmp_path):
    full = runs["deepseek_v3"]
    res = analyze_stats(full.out_dir / "stats.safetensors", tmp_path / "from_stats")
    a = json.loads((tmp_path / "from_stats" / "analysis.json").read_text())
    b = json.loads((full.out_dir / "analysis.json").read_text())
    for key in ("usage", "balance", "specialisation", "coactivation", "super_experts", "agreement"):
        assert a[key] == b[key], key
    for key in ("ratios", "dropped", "predicted", "predicted_per_domain"):
        assert a["probe"][key] == b["probe"][key]
    assert "measured" not in a["probe"] and "needs" in a["probe"]["measured_skipped"]
    assert "skipped" in a["locality"] and "moeprune analyze MODEL --calib" in a["locality"]["skipped"]
    assert a["notes"] and a["source"]["stats_file"].endswith("stats.safetensors")
    assert "locality" not in a["files"] and "stats" not in a["files"]
    assert not (tmp_path / "from_stats" / "locality.png").exists()
    report = json.loads((tmp_path / "from_stats" / "report.json").read_text())
    check_report(report, tmp_path / "from_stats")
    assert any("moeprune analyze MODEL" in p for p in report["sections"][0]["paragraphs"])
    assert res.sections() == report


def test_cli_end_to_end(root, ckpts, tmp_path, capsys):
    ckpt = ckpts["qwen3_moe"]
    out = tmp_path / "cli"
    argv = ["analyze", ckpt, "--calib", f"web={root / 'web.txt'}", "--calib", f"code={root / 'code.txt'}",
            "--samples", "2", "--seq-len", "24", "--out", out, "--ratios", "0.25, 0.5", "--lengths", "4,8",
            "--criteria", "reap,frequency"]
    assert main([str(v) for v in argv]) == 0
    assert "Redundancy probe" in capsys.readouterr().out
    a = json.loads((out / "analysis.json").read_text())
    assert a["probe"]["ratios"] == [0.25, 0.5] and a["locality"]["lengths"] == [4, 8]
    assert a["agreement"][0]["methods"] == ["frequency", "random", "reap"]
    assert main(["analyze", "--stats", str(out / "stats.safetensors"), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "analysis.json").is_file()


# ------------------------------------------------------------------------------------------ refusals


@pytest.fixture
def nothing_runs(monkeypatch):
    """Loading, calibrating and writing fail loudly: refusals must come before them."""

    def forbid(name):
        def _fail(*args, **kwargs):
            raise AssertionError(f"{name} ran before the bad input was refused")

        return _fail

    monkeypatch.setattr(calib_run, "load_model", forbid("load_model"))
    monkeypatch.setattr(calib_run, "_load", forbid("_load"))
    monkeypatch.setattr(analysis_run, "collect", forbid("collect"))
    monkeypatch.setattr(analysis_run, "atomic_dir", forbid("atomic_dir"))
    monkeypatch.setattr(ExpertStats, "load", forbid("ExpertStats.load"))


@pytest.mark.parametrize("extra, patterns", [
    ([], [r"no calibration data: pass at least one --calib"]),
    (["CALIB", "--ratios", "0.5,1.5"], [r"strictly between 0 and 1"]),
    (["CALIB", "--ratios", "a quarter"], [r"comma-separated floats, e.g. --ratios 0.1"]),
    (["CALIB", "--ratios", "0.05"], [r"none of --ratios \[0.05\] can be applied", r"use at least 0.25"]),
    (["CALIB", "--lengths", "0,16"], [r"segment lengths are integers >= 1"]),
    (["CALIB", "--cliff", "2"], [r"--cliff 2.0: .* strictly between 0 and 1"]),
    (["CALIB", "--criteria", "aimer"], [r"scores weights.*Drop it from --criteria"]),
    (["CALIB", "--criteria", "nope"], [r"nope"]),
    (["CALIB", "--stats", "STATS"], [r"either MODEL .* or --stats FILE"]),
])
def test_bad_input_refused_before_loading(ckpts, root, tmp_path, capsys, nothing_runs, extra, patterns):
    ckpt, out = ckpts["deepseek_v3"], tmp_path / "out"
    calib_flags = ["--calib", f"web={root / 'web.txt'}"]
    args = [a for e in extra for a in (calib_flags if e == "CALIB" else [tmp_path / "s.safetensors"]
                                       if e == "STATS" else [e])]
    assert_cli_refused(["analyze", ckpt, *args, "--out", out], patterns, capsys, inputs=[ckpt], out=out)


def test_output_refusals(ckpts, root, tmp_path, capsys, nothing_runs):
    ckpt = ckpts["qwen3_moe"]
    calib_flags = ["--calib", f"web={root / 'web.txt'}"]
    existing = tmp_path / "existing"
    existing.mkdir()
    assert_cli_refused(["analyze", ckpt, *calib_flags, "--out", existing], [r"already exists; pass --overwrite"],
                       capsys, inputs=[ckpt, existing], out=existing)
    assert_cli_refused(["analyze", ckpt, *calib_flags, "--out", ckpt, "--overwrite"], [r"is the input checkpoint"],
                       capsys, inputs=[ckpt], out=ckpt)
    assert_cli_refused(["analyze", ckpt, *calib_flags, "--out", ckpt / "analysis"], [r"inside it"],
                       capsys, inputs=[ckpt], out=ckpt / "analysis")
    out = tmp_path / "out"
    assert_cli_refused(["analyze", "--out", out], [r"nothing to analyze: pass MODEL --calib"], capsys, inputs=[],
                       out=out)
    assert_cli_refused(["analyze", "--stats", tmp_path / "s.safetensors", *calib_flags, "--out", out],
                       [r"--calib needs MODEL"], capsys, inputs=[], out=out)

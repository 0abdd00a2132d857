"""STUN's expert stage (`select/stun.py`): planted clusters, its distances and linkage against independent
references (brute force on the logits, scipy's complete linkage), one calibration pass whatever E, and the
export against the original with the dropped experts masked in its own router."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.calibration.run import CalibrateOptions
from moeprune.merge.grouping import agglomerate
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.models.routing import RoutingSpec
from moeprune.select.stun import representative, stun_distance, stun_layer
from moeprune.stats.routed import RoutedStats
from moeprune.tiny import save_tiny
from refusal import assert_refused
from textgen import write_words


def stats_from(logits: torch.Tensor, top_k: int) -> RoutedStats:
    """RoutedStats' coact / logit_gram / tokens of a layer from router logits [T, E] (written here, not collected)."""
    T, E = logits.shape
    s = RoutedStats(E)
    sel = torch.zeros(T, E, dtype=torch.float64).scatter_(1, logits.topk(top_k, dim=1).indices, 1.0)
    s.sums["coact"] = sel.T @ sel
    s.sums["logit_gram"] = logits.double().T @ logits.double()
    s.sums["tokens"] = torch.tensor([float(T)], dtype=torch.float64)
    s.sums["count"] = sel.sum(0)
    return s


def planted(seed=0):
    """8 experts in planted clusters {0,1,2}, {3,4}, {5}, {6,7}: members share a router direction (so they fire
    together and their logits move together). Weights: in {0,1,2} expert 2 sits at the centroid; a pair is
    equidistant from its centroid, so the lower index represents it."""
    g = torch.Generator().manual_seed(seed)
    clusters = [[0, 1, 2], [3, 4], [5], [6, 7]]
    T, H = 4000, 16
    x = torch.randn(T, H, generator=g)
    centres = torch.randn(len(clusters), H, generator=g) * 3
    rows = torch.zeros(8, H)
    for c, members in enumerate(clusters):
        for j in members:
            rows[j] = centres[c] + 0.05 * torch.randn(H, generator=g)
    weights = {}
    for members in clusters:  # the last member of 3 at the centroid, the others at ±offset; a pair at ±offset
        base = torch.randn(6, 4, generator=g)
        off = torch.randn(6, 4, generator=g)
        for n, j in enumerate(members):
            w = base + (0 if n == 2 else (1 if n == 0 else -1) * off)
            weights[j] = {"gate": w, "down": w.T.clone()}
    return x @ rows.T, clusters, weights


def test_router_distance_is_the_rms_logit_difference():
    logits = torch.randn(300, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = stats_from(logits, 2)
    d = stun_distance(s, list(range(6)), mix=1.0)  # r̂ alone
    r = torch.tensor([[float(((logits[:, i] - logits[:, j]) ** 2).mean().sqrt()) for j in range(6)] for i in range(6)],
                     dtype=torch.float64)
    off = ~torch.eye(6, dtype=torch.bool)
    want = r / r[off].mean()
    assert torch.allclose(d[off], want[off], rtol=1e-7)
    co = s.sums["coact"]
    want_c = -co / co[off].mean()
    assert torch.allclose(stun_distance(s, list(range(6)), mix=0.0)[off], want_c[off], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_complete_linkage_equals_scipy(seed):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(9, 3, generator=g, dtype=torch.float64)
    dist = torch.cdist(pts, pts)
    for n in (2, 4, 6):
        ours = sorted(sorted(c) for c in agglomerate(dist, n, "complete"))
        labels = fcluster(linkage(squareform(dist.numpy(), checks=False), "complete"), n, "maxclust")
        theirs = sorted(sorted(int(i) for i in range(9) if labels[i] == lab) for lab in set(labels))
        assert ours == theirs


def test_complete_linkage_heights_and_ties_by_brute_force():
    """The matrix-updated complete linkage against recomputing max over A × B for every pair at every step (the
    first (a, b) pair on ties, the earlier cluster absorbing the later), on distances with many ties; its heights
    are those maxima, non-decreasing, and scipy's merge heights."""
    from moeprune.merge.grouping import complete_linkage

    def brute(dist, n):
        clusters, heights = [[i] for i in range(dist.shape[0])], []
        while len(clusters) > n:
            best, pair = float("inf"), (0, 1)
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    d = max(float(dist[i, j]) for i in clusters[a] for j in clusters[b])
                    if d < best:
                        best, pair = d, (a, b)
            heights.append(best)
            clusters[pair[0]] = clusters[pair[0]] + clusters.pop(pair[1])
        return clusters, heights

    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        m = 2 + trial % 11
        x = torch.randint(0, 4, (m, m), generator=g).double() if trial % 2 else torch.rand(m, m, generator=g)
        dist = (x + x.T) / 2
        for n in {1, max(1, m // 2), m}:
            got, want = complete_linkage(dist, n), brute(dist, n)
            assert got == want
        heights = complete_linkage(dist)[1]
        assert heights == sorted(heights)
        if trial % 2 == 0:  # no ties: one dendrogram, whoever breaks ties (with ties scipy may merge otherwise)
            scipy_heights = linkage(squareform(dist.fill_diagonal_(0).numpy(), checks=False), "complete")[:, 2]
            assert heights == pytest.approx(sorted(scipy_heights.tolist()))


def test_planted_clusters_and_representatives():
    logits, clusters, weights = planted()
    s = stats_from(logits, 2)
    routing = RoutingSpec("softmax_topk", top_k=2)
    for mix in (1.0, 0.5):
        kept, found = stun_layer(s, lambda j: weights[j], 0.5, routing, 8, mix=mix, keep="centroid")
        assert sorted(sorted(c) for c in found) == sorted(sorted(c) for c in clusters)
        assert kept == [2, 3, 5, 6]
    most_used = [max(c, key=lambda j: (float(s.sums["count"][j]), -j)) for c in clusters]
    assert stun_layer(s, lambda j: weights[j], 0.5, routing, 8, keep="usage")[0] == sorted(most_used)
    assert representative([0, 1, 2], lambda j: weights[j]) == 2
    assert representative([3, 4], lambda j: weights[j]) == 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stun")
    write_words(root / "web.txt")
    return root


def calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48)


def test_export_equals_the_masked_original_and_one_pass_whatever_e(root, tmp_path, monkeypatch):
    from moeprune.calibration import session

    calls = []
    real = session.collect

    def counting(model, *args, **kwargs):
        n = [0]
        h = model.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        try:
            return real(model, *args, **kwargs)
        finally:
            h.remove()
            calls.append(n[0])

    monkeypatch.setattr(session, "collect", counting)
    import moeprune.calibration.run as run_mod

    monkeypatch.setattr(run_mod, "collect", counting)
    for E, extra in ((8, {}), (16, {"keep": "centroid", "mix": 0.5})):  # the centroid rule reads the weights
        src = save_tiny("qwen3_moe", tmp_path / f"src{E}", seed=2, with_tokenizer=True, num_experts=E,
                        num_experts_per_tok=2)
        applied, result = moeprune.prune(src, tmp_path / f"s{E}", recipe=[{"method": "stun", "ratio": 0.5, **extra}],
                                         calib=calib(root))
        assert result.passed
        plan = json.loads((tmp_path / f"s{E}" / "moeprune_plans" / "1-experts.json").read_text())
        assert plan["method"] == "stun" and all(len(c) == E // 2 for c in plan["clusters"].values())
        kept = {int(k): v for k, v in plan["kept_experts"].items()}
        assert all(sorted(c[0] for c in plan["clusters"][str(k)]) == v for k, v in kept.items())
        original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        adapter = get_adapter(original.config, model=original)
        dropped = {k: [j for j in range(E) if j not in v] for k, v in kept.items()}
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / f"s{E}", dtype=torch.float32).eval()
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(E))
        with torch.no_grad(), masked_experts(original, adapter, dropped):
            want = original(input_ids=ids).logits
        with torch.no_grad():
            got = stock(input_ids=ids).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert len(calls) == 2 and calls[0] == calls[1] > 0  # the same forward passes for E = 8 and E = 16
    # layer by layer (--lazy): the same plan as in memory
    moeprune.prune(tmp_path / "src16", tmp_path / "lazy", recipe=[{"method": "stun", "ratio": 0.5, "keep": "centroid",
                                                                   "mix": 0.5}], calib=calib(root), lazy=True)
    lazy_plan = json.loads((tmp_path / "lazy" / "moeprune_plans" / "1-experts.json").read_text())
    assert lazy_plan["clusters"] == json.loads((tmp_path / "s16" / "moeprune_plans" / "1-experts.json").read_text())[
        "clusters"]


@pytest.mark.parametrize("stage,match", [
    ({"method": "reap", "ratio": 0.5, "mix": 0.5}, "drop them with method 'reap'"),
    ({"method": "stun", "ratio": 0.5, "keep": "best"}, "centroid"),
    ({"method": "stun", "ratio": 0.5, "policy": "global"}, "--policy global"),
    ({"method": "stun", "ratio": 0.5, "protect": ["1:0"]}, "--protect"),
    ({"method": "stun", "ratio": 0.5, "mix": 1.5}, r"in \[0, 1\]"),
])
def test_refusals_before_any_work(root, tmp_path, no_work, stage, match):
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=2, with_tokenizer=True)
    assert_refused(lambda: moeprune.prune(src, tmp_path / "out", recipe=[stage], calib=calib(root)),
                   match, inputs=[src], out=tmp_path / "out")

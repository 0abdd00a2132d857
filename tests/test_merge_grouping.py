"""Merge grouping (M-SMoE, HC-SMoE, Sub-MoE, DERN) against independent references: direct cosines, scipy's
average-linkage clustering, explicit spherical k-means in feature space, and a loop-by-loop DERN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from moeprune.errors import MoePruneError
from moeprune.merge.align import permute
from moeprune.merge.build import adaptive_counts, make_merge_plan, router_partition
from moeprune.merge.dern import merge_dern
from moeprune.merge.grouping import (
    cosine_from_gram,
    group_layer,
    hcsmoe_groups,
    kernel_kmeans,
    msmoe_groups,
    submoe_groups,
)
from moeprune.models.routing import RoutingSpec
from moeprune.stats.routed import RoutedStats


def stats_with(counts, logits=None, outputs=None) -> RoutedStats:
    """RoutedStats with usage `counts` [E], router logits [T, E] and probe outputs [P, E, H] summed as the
    collector sums them."""
    E = len(counts)
    st = RoutedStats(E)
    st.sums["count"] = torch.tensor(counts, dtype=torch.float64)
    st.sums["gate_sum"] = torch.tensor(counts, dtype=torch.float64) * 0.5
    if logits is not None:
        st.sums["logit_gram"] = logits.double().T @ logits.double()
    if outputs is not None:
        st.update_grouping(None, torch.ones(0, dtype=torch.bool), outputs)
    return st


def as_partition(groups) -> set[frozenset]:
    return {frozenset(g) for g in groups}


def test_cosine_from_gram_matches_direct_cosine():
    x = torch.randn(7, 5, dtype=torch.float64)
    x[3] = 0  # a zero vector has cosine 0 with everything
    want = F.cosine_similarity(x[:, None], x[None], dim=-1)
    want[3], want[:, 3] = 0, 0
    assert torch.allclose(cosine_from_gram(x @ x.T), want, atol=1e-12)


def test_msmoe_dominants_by_usage_and_members_by_logit_similarity():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 4, generator=g, dtype=torch.float64)
    logits = torch.cat([base, 2 * base + 0.01 * torch.randn(50, 4, generator=g, dtype=torch.float64)], dim=1)
    counts = [90, 80, 70, 60, 5, 4, 3, 2]  # experts 4..7 are rare twins of 0..3 (same logit direction)
    groups = msmoe_groups(stats_with(counts, logits), list(range(8)), 4)
    assert groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # brute force on random data: every non-dominant joins the dominant of highest direct cosine
    logits = torch.randn(40, 8, generator=g, dtype=torch.float64)
    counts = torch.randperm(8, generator=g).tolist()
    groups = msmoe_groups(stats_with(counts, logits), list(range(8)), 3)
    dominants = sorted(range(8), key=lambda j: -counts[j])[:3]
    assert [grp[0] for grp in groups] == dominants
    cos = F.cosine_similarity(logits.T[:, None], logits.T[None], dim=-1)
    for grp in groups:
        for j in grp[1:]:
            assert grp[0] == max(dominants, key=lambda d: cos[j, d])


def test_hcsmoe_equals_scipy_average_linkage():
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        E, n = 10, 3 + trial % 3
        outputs = torch.randn(6, E, 8, generator=g, dtype=torch.float64)  # [P, E, H]
        counts = torch.randint(1, 100, (E,), generator=g).tolist()
        groups = hcsmoe_groups(stats_with(counts, outputs=outputs), list(range(E)), n)
        mu = outputs.sum(0)  # [E, H]
        dist = (1 - F.cosine_similarity(mu[:, None], mu[None], dim=-1)).clamp_min(0).numpy()
        dist = (dist + dist.T) / 2
        labels = fcluster(linkage(squareform(dist, checks=False), method="average"), n, criterion="maxclust")
        want = {frozenset(j for j in range(E) if labels[j] == c) for c in set(labels)}
        assert as_partition(groups) == want
        for grp in groups:  # dominant = most used member
            assert counts[grp[0]] == max(counts[j] for j in grp)


def spherical_kmeans(x: torch.Tensor, seeds: list[int], iters: int = 100) -> list[int]:
    """Reference: k-means on unit vectors in feature space, centroid = mean of the members' unit vectors."""
    u = F.normalize(x, dim=1)
    centroids = u[seeds].clone()
    labels = None
    for _ in range(iters):
        new = (u @ F.normalize(centroids, dim=1).T).argmax(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([u[labels == c].mean(0) for c in range(len(seeds))])
    return labels.tolist()


def test_average_linkage_merges_as_recomputing_every_mean():
    """The running-sum average linkage against recomputing mean(dist over A × B) for every pair at every step (the
    first (a, b) pair on ties) — on distances with many exact ties and on ones whose means differ in the last
    bits between summation orders (thirds)."""
    from moeprune.merge.grouping import agglomerate

    def brute(dist, n):
        clusters = [[i] for i in range(dist.shape[0])]
        while len(clusters) > n:
            best, pair = float("inf"), (0, 1)
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    d = float(torch.mean(dist[clusters[a]][:, clusters[b]]))
                    if d < best:
                        best, pair = d, (a, b)
            clusters[pair[0]] = clusters[pair[0]] + clusters.pop(pair[1])
        return clusters

    g = torch.Generator().manual_seed(11)
    for trial in range(60):
        m = 2 + trial % 13
        x = [torch.randint(0, 3, (m, m), generator=g).double() / 3, torch.rand(m, m, generator=g).double(),
             torch.randint(0, 2, (m, m), generator=g).double() * 0.1][trial % 3]
        dist = (x + x.T) / 2
        for n in {1, max(1, m // 3), m - 1}:
            assert agglomerate(dist, n, "average") == brute(dist, n), (trial, n)


def test_kernel_kmeans_equals_feature_space_kmeans():
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        centers = torch.randn(3, 12, generator=g, dtype=torch.float64)
        x = torch.cat([centers[c] + 0.6 * torch.randn(4, 12, generator=g, dtype=torch.float64) for c in range(3)])
        seeds = [0, 5, 9]
        kernel = cosine_from_gram(x @ x.T)
        assert kernel_kmeans(kernel, seeds) == spherical_kmeans(x, seeds)


def test_submoe_recovers_planted_clusters():
    g = torch.Generator().manual_seed(3)
    E, P, H = 9, 5, 6
    centers = torch.randn(3, P, H, generator=g, dtype=torch.float64)
    truth = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    outputs = torch.stack([centers[c] + 0.05 * torch.randn(P, H, generator=g, dtype=torch.float64)
                           for c in truth], dim=1)  # [P, E, H]
    counts = [10, 1, 2, 3, 20, 4, 5, 6, 30]  # seeds (top usage 8, 4, 0) are all in different clusters ...
    groups = submoe_groups(stats_with(counts, outputs=outputs), list(range(E)), 3)
    assert as_partition(groups) == {frozenset(j for j in range(E) if truth[j] == c) for c in range(3)}
    counts = [30, 1, 2, 20, 4, 5, 10, 6, 3]  # ... and when the seeds share a cluster, k-means still separates
    groups = submoe_groups(stats_with(counts, outputs=outputs), list(range(E)), 3)
    assert as_partition(groups) == {frozenset(j for j in range(E) if truth[j] == c) for c in range(3)}


def test_grouping_stays_inside_router_groups_and_counts_split_evenly():
    g = torch.Generator().manual_seed(4)
    st = stats_with(torch.randint(1, 50, (8,), generator=g).tolist(), torch.randn(30, 8, generator=g),
                    torch.randn(4, 8, 5, generator=g))
    part = router_partition(8, RoutingSpec(kind="sigmoid_grouped", top_k=2, n_group=2, topk_group=1))
    assert part == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for method in ("msmoe", "hcsmoe", "submoe", "dern"):
        groups = group_layer(method, st, 4, part)
        assert len(groups) == 4 and [grp[0] for grp in groups] == sorted(grp[0] for grp in groups)
        assert all(len({j // 4 for j in grp}) == 1 for grp in groups), (method, groups)
        assert sum(1 for grp in groups if grp[0] < 4) == 2
    with pytest.raises(MoePruneError, match="split evenly"):
        group_layer("msmoe", st, 3, part)


def test_adaptive_counts_follow_global_usage():
    flat, peaked = RoutedStats(4), RoutedStats(4)
    flat.sums["count"] = torch.tensor([25.0, 25, 25, 25])
    peaked.sums["count"] = torch.tensor([70.0, 20, 6, 4])
    # global ranking of normalised usage: 0.70(p) 0.25×4(f) 0.20(p) 0.06(p) 0.04(p); 4 slots -> p:1, f:3
    assert adaptive_counts({1: flat, 2: peaked}, total=4, floor=1, step=1) == {1: 3, 2: 1}
    assert adaptive_counts({1: flat, 2: peaked}, total=4, floor=2, step=1) == {1: 3, 2: 2}


def test_merge_plan_needs_probes_for_output_groupings():
    from moeprune.stats.store import ExpertStats

    st = stats_with([5, 4, 3, 2, 1, 1, 1, 1], torch.randn(20, 8))
    stats = ExpertStats("qwen3_moe", 8, 2, [1], "x" * 64, {"s": {1: st}},
                        {"routing": {"kind": "softmax_topk", "top_k": 2}})
    plan = make_merge_plan(stats, "msmoe", 0.5)
    assert len(plan.groups[1]) == 4 and plan.weights[1][0][0] == 5.0
    with pytest.raises(MoePruneError, match="re-run `moeprune calibrate`"):
        make_merge_plan(stats, "hcsmoe", 0.5)
    with pytest.raises(MoePruneError, match="Did you mean 'msmoe'"):
        make_merge_plan(stats, "msmo", 0.5)
    with pytest.raises(MoePruneError, match="--budget"):
        make_merge_plan(stats, "msmoe", 0.5, budget="expert")


# ----------------------------------------------------------------------------------------------- DERN
def random_expert(g, inter=6, hidden=5, bias=False) -> dict[str, torch.Tensor]:
    e = {"gate": torch.randn(inter, hidden, generator=g, dtype=torch.float64),
         "up": torch.randn(inter, hidden, generator=g, dtype=torch.float64),
         "down": torch.randn(hidden, inter, generator=g, dtype=torch.float64)}
    if bias:
        e |= {"gate_bias": torch.randn(inter, generator=g, dtype=torch.float64),
              "up_bias": torch.randn(inter, generator=g, dtype=torch.float64),
              "down_bias": torch.randn(hidden, generator=g, dtype=torch.float64)}
    return e


def dern_reference(experts, groups, weights, threshold):
    """Loop-by-loop DERN: every dropped neuron to the retained neuron of highest cosine (any survivor), then a
    usage-weighted mean per retained neuron."""
    survivors = [g[0] for g in groups]
    usage = {j: w for g, ws in zip(groups, weights, strict=False) for j, w in zip(g, ws, strict=False)}

    def feat(e, k):
        parts = [e["gate"][k], e["up"][k], e["down"][:, k]]
        parts += [e[b][k : k + 1] for b in ("gate_bias", "up_bias") if b in e]
        return torch.cat(parts)

    inter = experts[0]["gate"].shape[0]
    sums = {s: {k: [(usage[s], s, k)] for k in range(inter)} for s in survivors}
    for d in sorted(j for g in groups for j in g[1:]):
        for k in range(inter):
            best, where = -2.0, None
            for s in survivors:
                for k2 in range(inter):
                    c = float(F.cosine_similarity(feat(experts[d], k), feat(experts[s], k2), dim=0))
                    if c > best:
                        best, where = c, (s, k2)
            if best >= threshold:
                sums[where[0]][where[1]].append((usage[d], d, k))
    out = []
    for s in survivors:
        e = {r: t.clone() for r, t in experts[s].items()}
        for k2, parts in sums[s].items():
            total = sum(w for w, _, _ in parts)
            for r in ("gate", "up", "gate_bias", "up_bias"):
                if r in e:
                    e[r][k2] = sum(w * experts[j][r][k] for w, j, k in parts) / total
            e["down"][:, k2] = sum(w * experts[j]["down"][:, k] for w, j, k in parts) / total
        out.append(e)
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_dern_equals_loop_reference(bias):
    g = torch.Generator().manual_seed(5)
    experts = [random_expert(g, bias=bias) for _ in range(6)]
    groups, weights = [[0, 3], [2, 1, 5], [4]], [[3.0, 1.0], [2.0, 0.5, 1.5], [4.0]]
    for threshold in (-1.0, 0.2, 0.5):
        got = merge_dern(experts, groups, weights, threshold)
        want = dern_reference(experts, groups, weights, threshold)
        for a, b in zip(got, want, strict=False):
            assert a.keys() == b.keys()
            for r in a:
                assert torch.allclose(a[r], b[r], atol=1e-12), (threshold, r)


def test_dern_with_nothing_compatible_is_pruning_and_a_permuted_twin_changes_nothing():
    g = torch.Generator().manual_seed(6)
    experts = [random_expert(g) for _ in range(4)]
    got = merge_dern(experts, [[0, 1], [2, 3]], [[1.0, 1.0], [1.0, 1.0]], threshold=1.01)
    assert all(torch.equal(got[0][r], experts[0][r]) and torch.equal(got[1][r], experts[2][r]) for r in got[0])
    twin = permute(experts[0], torch.randperm(6, generator=g))  # the same function, neurons relabelled
    got = merge_dern([experts[0], twin, experts[2]], [[0, 1], [2]], [[1.0, 3.0], [1.0]], threshold=0.99)
    assert all(torch.allclose(got[0][r], experts[0][r], atol=1e-12) for r in got[0])


# ----------------------------------------------------------------------------------------------- premise
def test_output_groupings_find_redundant_twins_in_a_real_model():
    """A model whose experts 4..7 are neuron-permuted, slightly perturbed copies of 0..3 with scaled-down router
    rows, calibrated through the real engine: HC-SMoE and Sub-MoE pair every twin with its original in every
    layer. (M-SMoE is left out: a twin that takes a share of its original's traffic can outrank a rarely used
    original as a dominant, by the method's design.)"""
    from moeprune.calibration import session
    from moeprune.calibration.data import CalibSet
    from moeprune.models import get_adapter
    from moeprune.pipeline.verify import seeded_inputs
    from moeprune.tiny import tiny_model

    g = torch.Generator().manual_seed(7)
    model = tiny_model("qwen3_moe", seed=3).eval()
    adapter = get_adapter(model.config, model=model)
    with torch.no_grad():
        for layer in adapter.moe_layers():
            block = adapter.block(model, layer)
            roles = adapter.expert_roles(block)
            for j in range(4):
                src = {r: roles[r][j].clone() for r in roles}
                twin = permute(src, torch.randperm(src["gate"].shape[0], generator=g))
                for r, t in twin.items():
                    roles[r][j + 4].copy_(t + 0.02 * t.abs().mean() * torch.randn(t.shape, generator=g))
            w = adapter.router(block).weight
            w[4:].copy_(0.3 * w[:4] + 0.02 * w[:4].abs().mean() * torch.randn(w[:4].shape, generator=g))
    inputs = seeded_inputs(96, batch=6, seq_len=32, seed=5)
    calib = CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)
    stats = session.collect(model, adapter, [calib], probe_stride=2).stats["s"]
    for method in ("hcsmoe", "submoe"):
        for layer in adapter.moe_layers():
            groups = group_layer(method, stats[layer], 4, [list(range(8))])
            assert as_partition(groups) == {frozenset({j, j + 4}) for j in range(4)}, (method, layer, groups)

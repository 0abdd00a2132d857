"""Which experts of a MoE layer merge together: the grouping step of M-SMoE, HC-SMoE, Sub-MoE and DERN.

Every method works on one layer's calibration statistics (`stats.routed.RoutedStats`) and a set of member experts
(the whole layer, or one router group of a group-limited router), and returns `n` groups, each with its *dominant*
first (the member with the largest usage |A_j|, lower index on ties: its router row survives and it anchors the
alignment). Similarities come from sums, so they need no per-token storage:

    cos_G(i, j) = G_ij / sqrt(G_ii · G_jj)            for a Gram matrix G (0 where a diagonal entry is 0)

- msmoe (M-SMoE / MC-SMoE): dominants = the n most used experts; every other expert joins the dominant whose
  router-logit column is most similar, cos_G with G = Σ_t ℓ(t) ℓ(t)ᵀ (`logit_gram`).
- hcsmoe (HC-SMoE): agglomerative clustering, average linkage, on the cosine similarity of the experts' mean
  outputs μ_j = (1/|P|) Σ_{t∈P} f_j(t) over the probe tokens (`out_sum`), merged until n clusters remain.
- submoe (Sub-MoE): k-means with the cosine kernel of the experts' concatenated probe outputs
  K = cos_G(out_gram) (spherical k-means on [f_j(t)]_{t∈P}, done in kernel space: centroid similarity
  s(j, c) = mean_{i∈c} K_ji / sqrt(mean_{i,i'∈c} K_ii')), seeded with the n most used experts, Lloyd iterations
  until no assignment changes; an empty cluster is re-seeded with the point least similar to its own centroid.
- dern (DERN): survivors = the n experts with the largest router statistic Σ_{A_j} g_j(t) (soft frequency);
  the other experts are only *recorded* in the group of the survivor most similar by router logits — their
  neurons are redistributed across all survivors at merge time (`merge.dern`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeprune.errors import MoePruneError
from moeprune.registry import Registry
from moeprune.stats.routed import RoutedStats

GroupFn = Callable[[RoutedStats, list[int], int], list[list[int]]]


@dataclass(frozen=True)
class Grouping:
    name: str
    fn: GroupFn
    merge: str  # default merge of the groups (merge.registry)
    needs_probes: bool  # needs every-expert outputs on probe tokens (calibrate with this version)
    doc: str


GROUPINGS: Registry[Grouping] = Registry("merge method", "Expert merging: msmoe, hcsmoe, submoe, dern.")


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """[E, E] Gram matrix -> [E, E] cosine similarity (rows/columns with zero norm give 0)."""
    g = gram.double()
    d = g.diagonal().clamp_min(0).sqrt()  # [E]
    denom = d[:, None] * d[None, :]
    return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))


def by_usage(stats: RoutedStats, members: list[int], field: str = "count") -> list[int]:
    """Members sorted by usage, most used first (lower index first on ties)."""
    u = stats.sums[field]
    return sorted(members, key=lambda j: (-float(u[j]), j))


def _dominant_first(groups: list[list[int]], stats: RoutedStats) -> list[list[int]]:
    return [by_usage(stats, g) for g in groups]


def _assign_to_dominants(dominants: list[int], others: list[int], sim: torch.Tensor) -> list[list[int]]:
    groups = {d: [d] for d in dominants}
    for j in others:
        best = max(dominants, key=lambda d: (float(sim[j, d]), -d))
        groups[best].append(j)
    return [groups[d] for d in dominants]


def msmoe_groups(stats: RoutedStats, members: list[int], n: int) -> list[list[int]]:
    order = by_usage(stats, members)
    sim = cosine_from_gram(stats.sums["logit_gram"])
    return _assign_to_dominants(order[:n], order[n:], sim)


def _require_probes(stats: RoutedStats, method: str) -> None:
    if not stats.has_probes:
        raise MoePruneError(f"{method} groups experts by their outputs on probe tokens, which these statistics "
                            "lack (written before merging existed, or every row was shorter than one probe): "
                            "re-run `moeprune calibrate` with this version (see --probe-stride).")


def hcsmoe_groups(stats: RoutedStats, members: list[int], n: int) -> list[list[int]]:
    _require_probes(stats, "hcsmoe")
    mu = stats.sums["out_sum"][members].double()  # [m, H] (the 1/|P| does not change cosines)
    sim = cosine_from_gram(mu @ mu.T)  # [m, m]
    clusters = agglomerate(-sim, n, "average")  # the largest mean similarity = the smallest mean distance
    return _dominant_first([[members[i] for i in c] for c in clusters], stats)


def agglomerate(dist: torch.Tensor, n: int, linkage: str = "average") -> list[list[int]]:
    """Agglomerative clustering of m points into n clusters from a distance matrix dist [m, m] (diagonal unused):
    repeatedly merge the two clusters A, B with the smallest linkage distance D(A, B) — "average": the mean of
    dist over A × B (HC-SMoE), "complete": the max (STUN) — the first pair in (a, b) order on ties. Clusters are
    lists of row indices, in merge order (the earlier cluster absorbs the later)."""
    if linkage == "complete":
        return complete_linkage(dist, n)[0]
    if linkage == "average":
        return average_linkage(dist, n)
    raise MoePruneError(f"linkage {linkage!r}: choose average or complete.")


def average_linkage(dist: torch.Tensor, n: int) -> list[list[int]]:
    """`agglomerate(dist, n, "average")` at O(k²) per merge: the sums Σ_{A×B} dist live in a matrix updated by
    Σ(A ∪ B, C) = Σ(A, C) + Σ(B, C), and D(A, B) = Σ(A, B) / (|A||B|). Those sums are added in another order than
    a mean over A × B, so they may differ from it in the last bits: every pair within `margin` of the smallest is
    recomputed as that mean, and the smallest mean (first pair on ties) merges — the merges of recomputing every
    mean at every step. Each of the two sums of n ≤ m² terms errs by at most n·2⁻⁵³·max|dist| (float64), so a pair
    whose exact mean is the smallest is within 4·n·2⁻⁵³·max|dist| < 2⁻³¹·max|dist| of the smallest matrix value
    for m < 2¹⁰; margin = 2⁻²⁸·max|dist| (finite entries) leaves room to spare."""
    m = dist.shape[0]
    if m >= 2**10:
        raise MoePruneError(f"average linkage over {m} points: at most 1023 (the exactness margin); cluster groups.")
    d = dist.double()
    finite = d[d.isfinite()]
    margin = 2.0 ** -28 * float(finite.abs().max()) if finite.numel() else 0.0
    total = d.clone()  # [k, k] Σ_{A×B} dist between the current clusters
    sizes = torch.ones(m, dtype=torch.float64)
    clusters = [[i] for i in range(m)]
    while len(clusters) > n:
        k = len(clusters)
        mean = total / (sizes[:, None] * sizes[None, :])
        upper = torch.ones(k, k, dtype=torch.bool).triu(1)
        mean = torch.where(upper, mean, torch.full_like(mean, float("inf")))
        near = (mean <= mean.min() + margin).nonzero().tolist()  # row-major: (a, b) order
        best, pair = float("inf"), tuple(near[0]) if near else (0, 1)
        for a, b in near:  # the exact means of the candidates, as a direct mean over A × B computes them
            exact = float(torch.mean(d[clusters[a]][:, clusters[b]]))
            if exact < best:
                best, pair = exact, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)
        row = total[a] + total[b]  # [k]
        total[a, :], total[:, a] = row, row
        total[a, a] = 0.0  # unused (diagonal)
        sizes[a] += sizes[b]
        rest = [i for i in range(k) if i != b]
        total, sizes = total[rest][:, rest], sizes[rest]
    return clusters


def complete_linkage(dist: torch.Tensor, n: int = 1) -> tuple[list[list[int]], list[float]]:
    """`agglomerate(dist, n, "complete")` with the merge heights: (clusters when n remain, D(A, B) of each merge
    made, in order — non-decreasing for complete linkage). The cluster distances live in a matrix updated by
    Lance-Williams, D(A ∪ B, C) = max(D(A, C), D(B, C)) — exact, so the merges and ties are those of recomputing
    max over A × B — at O(k²) per merge instead of O(k² · |A||B|)."""
    m = dist.shape[0]
    D = dist.double().clone()  # [k, k] between the current clusters
    D.fill_diagonal_(float("inf"))
    clusters, heights = [[i] for i in range(m)], []
    while len(clusters) > n:
        k = len(clusters)
        upper = torch.ones(k, k, dtype=torch.bool).triu(1)
        flat = torch.where(upper, D, torch.full_like(D, float("inf"))).reshape(-1)
        at = int(torch.argmin(flat))  # the first minimum in row-major order: the first (a, b) on ties
        a, b = divmod(at, k) if bool(flat[at] < float("inf")) else (0, 1)
        heights.append(float(D[a, b]))
        clusters[a] = clusters[a] + clusters.pop(b)
        row = torch.maximum(D[a], D[b])  # [k]
        D[a, :], D[:, a] = row, row
        D[a, a] = float("inf")
        rest = [i for i in range(k) if i != b]
        D = D[rest][:, rest]
    return clusters, heights


def kernel_kmeans(kernel: torch.Tensor, seeds: list[int], max_iter: int = 100) -> list[int]:
    """Spherical k-means in kernel space. kernel: [m, m] cosine kernel (unit diagonal where defined);
    seeds: n distinct point indices as the initial centroids. Returns the cluster of every point ([m] ints)."""
    m, n = kernel.shape[0], len(seeds)
    labels = torch.tensor([seeds.index(i) if i in seeds else -1 for i in range(m)])
    sim = kernel[:, seeds].clone()  # [m, n] similarity to the initial centroids (the seed points)
    for _ in range(max_iter):
        new = sim.argmax(dim=1)  # [m] (first maximum on ties)
        for c in range(n):  # keep every cluster non-empty: re-seed with the worst-fitting point of a big cluster
            if not (new == c).any():
                fit = sim.gather(1, new[:, None]).squeeze(1)  # [m] similarity to the own centroid
                sizes = torch.bincount(new, minlength=n)
                fit[sizes[new] <= 1] = float("inf")
                new[int(fit.argmin())] = c
        if torch.equal(new, labels):
            break
        labels = new
        onehot = torch.nn.functional.one_hot(labels, n).double()  # [m, n]
        size = onehot.sum(0)  # [n]
        within = (onehot.T @ kernel @ onehot).diagonal() / size.square()  # [n] ‖centroid‖²
        sim = (kernel @ onehot) / size / within.clamp_min(1e-300).sqrt()  # [m, n]
    return labels.tolist()


def submoe_groups(stats: RoutedStats, members: list[int], n: int) -> list[list[int]]:
    _require_probes(stats, "submoe")
    kernel = cosine_from_gram(stats.sums["out_gram"][members][:, members])  # [m, m]
    order = by_usage(stats, members)
    labels = kernel_kmeans(kernel, [members.index(j) for j in order[:n]])
    clusters = [[members[i] for i in range(len(members)) if labels[i] == c] for c in range(n)]
    return _dominant_first(clusters, stats)


def dern_groups(stats: RoutedStats, members: list[int], n: int) -> list[list[int]]:
    order = by_usage(stats, members, "gate_sum")
    groups = _assign_to_dominants(order[:n], order[n:], cosine_from_gram(stats.sums["logit_gram"]))
    return [[g[0], *sorted(g[1:])] for g in groups]  # the survivor leads: chosen by router statistics, not count


for _g in (Grouping("msmoe", msmoe_groups, "average", False, "router-logit similarity, dominants by usage"),
           Grouping("hcsmoe", hcsmoe_groups, "average", True, "hierarchical clustering of mean expert outputs"),
           Grouping("submoe", submoe_groups, "svd", True, "k-means on expert-output cosine, joint-SVD merge"),
           Grouping("dern", dern_groups, "dern", False, "drop by router statistics, recombine neurons")):
    GROUPINGS.register(_g.name, _g)


def group_layer(method: str, stats: RoutedStats, n_keep: int, partition: list[list[int]]) -> list[list[int]]:
    """Groups of one layer, `n_keep` in all, split evenly over `partition` (router groups; [[0..E-1]] if none),
    ordered by their dominant."""
    g = GROUPINGS.get(method)
    if n_keep % len(partition):
        raise MoePruneError(f"{n_keep} merged experts do not split evenly over {len(partition)} router groups.")
    per = n_keep // len(partition)
    groups = [grp for part in partition for grp in g.fn(stats, list(part), per)]
    if len(groups) != n_keep or sorted(j for grp in groups for j in grp) != sorted(j for p in partition for j in p):
        raise AssertionError(f"{method} returned a grouping that does not cover the layer once")  # a bug, not input
    return sorted(groups, key=lambda grp: grp[0])

"""STUN's expert stage (Lee et al., ACL 2025, arXiv 2409.06211): cluster the experts of each layer by behaviour
similarity and keep one representative per cluster — O(1) forward passes.

Per MoE layer (or per router group of a group-limited router), from ONE calibration pass (the routed statistics
every calibrated criterion uses: `stats/routed.py`):

    ĉ_ij = coact_ij / mean_{i≠j} coact                       co-selection: tokens routing to both i and j
    r_ij = sqrt(max(0, G_ii + G_jj − 2·G_ij) / T)            G = Σ_t ℓ(t)ℓ(t)ᵀ (`logit_gram`), T tokens:
                                                              the RMS over calibration tokens of ℓ_i(t) − ℓ_j(t),
                                                              i.e. ‖X(w_i − w_j)‖/√T for a linear router — the
                                                              router-row distance measured where the data lies
    r̂_ij = r_ij / mean_{i≠j} r
    d_ij = −(1 − μ)·ĉ_ij + μ·r̂_ij                            (μ = `mix` ∈ [0, 1]; the released code's default path
                                                              is the router-row distance alone (μ = 1), its Arctic
                                                              run co-selection alone (μ = 0))

Complete-linkage agglomeration (`merge.grouping.agglomerate`) merges the two clusters whose farthest members are
closest until n = E_g − drop_g clusters remain (the released code merges the closest vertex pair whenever every
cross pair is under a threshold that is binary-searched to a global expert count — the same linkage rule; here the
count per layer is the uniform policy's, so exports stay stock-loadable). In each cluster the representative is
(`keep: centroid`, STUN's code) the expert closest to the cluster's weight centroid,

    rep(A) = argmin_{j∈A} Σ_roles ‖θ_j − (1/|A|) Σ_{i∈A} θ_i‖²        (lower index on ties)

or (`keep: usage`, the default) its most used member (routed-token count; lower index on ties) — a pair is always
equidistant from its centroid, so the centroid rule picks by index there. The other members are dropped: the
clusters are the proxy for the joint effect of removing them (experts that
fire together and route alike stand in for each other), so one greedy decision per cluster replaces a search over
subsets. Cost: the one calibration pass (1 forward per window, independent of E), and with `keep: centroid` one
read of the expert weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeprune.errors import MoePruneError
from moeprune.merge.grouping import agglomerate, by_usage
from moeprune.models.routing import RoutingSpec
from moeprune.select.uniform import drop_count
from moeprune.stats.routed import RoutedStats

STUN = "stun"
# Defaults measured on the testbed (benchmarks/RESULTS.md, "STUN"): co-selection clusters experts that complement
# each other under top-2 routing (×2.28 at 25 % whatever the representative); the router distance alone with the
# most used member kept: ×1.11.
DEFAULT_MIX = 1.0  # μ: router distance only
KEEPS = ("centroid", "usage")  # which member represents a cluster: nearest the weight centroid (STUN), most used
DEFAULT_KEEP = "usage"

# expert j's tensors by role (gate/up [I, H], down [H, I], biases) of one layer
ExpertTensors = Callable[[int], dict[str, torch.Tensor]]


def _off_mean(m: torch.Tensor) -> float:
    n = m.shape[0]
    if n < 2:
        return 1.0
    off = m.sum() - m.diagonal().sum()
    v = float(off) / (n * (n - 1))
    return v if v > 0 else 1.0


def stun_distance(stats: RoutedStats, members: list[int], mix: float = DEFAULT_MIX) -> torch.Tensor:
    """d [m, m] over `members` (module docstring); the diagonal is +inf."""
    idx = torch.tensor(members)
    coact = stats.sums["coact"].double()[idx][:, idx]  # [m, m]
    gram = stats.sums["logit_gram"].double()[idx][:, idx]  # [m, m]
    tokens = max(float(stats.sums["tokens"].sum()), 1.0)
    diag = gram.diagonal()
    r = ((diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0) / tokens).sqrt()  # [m, m]
    d = -(1 - mix) * coact / _off_mean(coact) + mix * r / _off_mean(r)
    d.fill_diagonal_(float("inf"))
    return d


def representative(cluster: list[int], tensors: ExpertTensors) -> int:
    """The member closest to the cluster's weight centroid (all roles together)."""
    if len(cluster) == 1:
        return cluster[0]
    per = {j: tensors(j) for j in cluster}
    dist = dict.fromkeys(cluster, 0.0)
    for role in per[cluster[0]]:
        stack = torch.stack([per[j][role].detach().double() for j in cluster])  # [|A|, ...]
        centre = stack.mean(dim=0)
        for n, j in enumerate(cluster):
            dist[j] += float((stack[n] - centre).square().sum())
    return min(cluster, key=lambda j: (dist[j], j))


def stun_layer(stats: RoutedStats, tensors: ExpertTensors, ratio: float, routing: RoutingSpec,
               num_experts: int, mix: float = DEFAULT_MIX, keep: str = DEFAULT_KEEP
               ) -> tuple[list[int], list[list[int]]]:
    """(kept experts ascending, clusters with their representative first) of one layer."""
    n_drop = drop_count(ratio, num_experts, routing)
    groups = routing.n_group if routing.group_limited else 1
    size = num_experts // groups
    kept, clusters = [], []
    for g in range(groups):
        members = list(range(g * size, (g + 1) * size))
        local = agglomerate(stun_distance(stats, members, mix), size - n_drop // groups, "complete")
        for c in local:
            cluster = sorted(members[i] for i in c)
            rep = representative(cluster, tensors) if keep == "centroid" else by_usage(stats, cluster)[0]
            kept.append(rep)
            clusters.append([rep, *[j for j in cluster if j != rep]])
    return sorted(kept), sorted(clusters, key=lambda c: c[0])


def check_keep(keep) -> str:
    if keep is None:
        return DEFAULT_KEEP
    if keep not in KEEPS:
        raise MoePruneError(f"keep {keep!r}: a cluster keeps the member nearest its weight centroid (centroid, "
                            "STUN's rule) or its most used member (usage).")
    return keep


def check_mix(mix) -> float:
    if mix is None:
        return DEFAULT_MIX
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0 <= mix <= 1:
        raise MoePruneError(f"mix {mix!r}: STUN's weight of the router distance against co-selection, in [0, 1] "
                            "(0: co-selection only, 1: router distance only).")
    return float(mix)


def require_stats(stats: RoutedStats, layer: int) -> None:
    if "logit_gram" not in stats.sums or "coact" not in stats.sums:
        raise MoePruneError(f"layer {layer}: STUN needs co-selection counts and the router-logit Gram, which "
                            "these statistics lack (written by an older moeprune): re-run `moeprune calibrate`.")


def validate_stun(o) -> None:
    """Options of `method: stun` (an `ExpertOptions`): mix only with stun; stun takes the uniform policy."""
    if o.method != STUN:
        raise MoePruneError(f"mix and keep configure STUN (method {STUN!r}); drop them with method {o.method!r}.")
    check_mix(o.mix)
    check_keep(o.keep)
    other = [flag for flag, on in (("--policy " + o.policy, o.policy != "uniform"), ("--floor", o.floor is not None),
                                   ("--protect", bool(o.protect)), ("--protect-super", o.protect_super),
                                   ("--as-you-go", o.as_you_go), ("--seed", o.seed is not None),
                                   ("--beam", o.beam is not None), ("--search-tokens", o.search_tokens is not None))
             if on]
    if other:
        raise MoePruneError(f"{', '.join(other)} {'does' if len(other) == 1 else 'do'} not apply to method {STUN!r}: "
                            "it keeps one representative per cluster with the same count in every layer (uniform). "
                            f"Drop {'it' if len(other) == 1 else 'them'}.")

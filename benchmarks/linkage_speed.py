"""Expert clustering time per layer at the expert counts of large MoEs: HC-SMoE's average linkage and STUN's complete
linkage (`merge/grouping.py`) against the direct loop they replaced (every pair's mean / max over A × B recomputed
at every merge), on the same random distances, one thread, with the clusters compared.

    python benchmarks/linkage_speed.py [--experts 64 128 256] [--drop 0.25]

The direct loop is O(k² · |A||B|) per merge; the library keeps the cluster distances in a matrix (O(k²) per
merge). The direct loop is skipped above --direct-max experts (it takes minutes there).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from moeprune.merge.grouping import agglomerate  # noqa: E402

torch.set_num_threads(1)


def direct(dist: torch.Tensor, n: int, linkage: str) -> list[list[int]]:
    """The loop the library replaced: recompute D(A, B) for every pair at every merge (first pair on ties)."""
    reduce = {"average": torch.mean, "complete": torch.amax}[linkage]
    clusters = [[i] for i in range(dist.shape[0])]
    while len(clusters) > n:
        best, pair = float("inf"), (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(reduce(dist[clusters[a]][:, clusters[b]]))
                if d < best:
                    best, pair = d, (a, b)
        clusters[pair[0]] = clusters[pair[0]] + clusters.pop(pair[1])
    return clusters


def timed(fn) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--drop", type=float, default=0.25, help="share of the experts merged away")
    ap.add_argument("--direct-max", type=int, default=128)
    a = ap.parse_args()
    print("| linkage | experts | merges | library s | direct s | direct / library | same clusters |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for E in a.experts:
        g = torch.Generator().manual_seed(E)
        x = torch.rand(E, E, generator=g, dtype=torch.float64)
        dist = (x + x.T) / 2
        n = E - round(a.drop * E)
        for linkage in ("average", "complete"):
            ours, t_ours = timed(lambda: agglomerate(dist, n, linkage))  # noqa: B023
            if E <= a.direct_max:
                ref, t_ref = timed(lambda: direct(dist, n, linkage))  # noqa: B023
                same, ratio, t_ref_s = str(ours == ref), f"{t_ref / t_ours:.0f}x", f"{t_ref:.2f}"
            else:
                same, ratio, t_ref_s = "not run", "", "(skipped)"
            print(f"| {linkage} | {E} | {E - n} | {t_ours:.3f} | {t_ref_s} | {ratio} | {same} |", flush=True)


if __name__ == "__main__":
    main()

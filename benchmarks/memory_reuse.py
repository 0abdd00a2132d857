"""What `io.memory.reuse_freed_memory` saves in a layer-by-layer run: one M-SMoE layer merged with and without it.

Layer-by-layer runs fix glibc's mmap threshold at 128 KiB (`io.memory.release_freed_memory`), so each large
temporary is mmapped and faults every page in. `merge_layer` runs its layer merge inside `reuse_freed_memory`;
this script times the same merge (`per_group(merge_average)`: weight matching + frequency-weighted average) on one
layer shaped like `benchmarks/big_model.py`'s checkpoint (128 random bf16 experts, H=1024, width 448, 32 pairs
merged, the other 64 experts kept), alternating:

    fixed   the fixed thresholds only (what every temporary paid before);
    reuse   inside `surgery.merge.merge_memory` = `reuse_freed_memory(keep_top=True)` (the mmap threshold raised,
            and with it the trim threshold, so a temporary freed at the heap's top is not returned to the OS at once).

    python benchmarks/memory_reuse.py [--repeats 3] [--pairs 32]

Prints seconds, minor page faults and system seconds per run (median over the repeats), one thread.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from moeprune.io.memory import release_freed_memory  # noqa: E402
from moeprune.merge.average import merge_average  # noqa: E402
from moeprune.merge.methods import per_group  # noqa: E402
from moeprune.surgery.merge import merge_memory  # noqa: E402

torch.set_num_threads(1)


def layer(experts: int, width: int, hidden: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"gate": torch.randn(width, hidden, generator=g).bfloat16(),  # [I, H]
             "up": torch.randn(width, hidden, generator=g).bfloat16(),    # [I, H]
             "down": torch.randn(hidden, width, generator=g).bfloat16()}  # [H, I]
            for _ in range(experts)]


def run(experts, groups, weights, reuse: bool) -> tuple[float, int, float]:
    """(seconds, minor faults, system seconds) of one layer merge."""
    merge = per_group(merge_average)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if reuse:
        with merge_memory(experts[0]):  # the context `merge_layer` runs its layer merge in
            merge(experts, groups, weights)
    else:
        merge(experts, groups, weights)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - t0, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--width", type=int, default=448)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if not release_freed_memory():
        raise SystemExit("no glibc mallopt here: layer-by-layer runs do not fix the thresholds, nothing to compare")
    experts = layer(a.experts, a.width, a.hidden)
    groups = [[2 * i, 2 * i + 1] for i in range(a.pairs)] + [[j] for j in range(2 * a.pairs, a.experts)]
    weights = [[0.6, 0.4]] * a.pairs + [[1.0]] * (a.experts - 2 * a.pairs)
    run(experts, groups[:1], weights[:1], False)  # imports (scipy) and first-touch outside the timings
    rows = {"fixed": [], "reuse": []}
    for _ in range(a.repeats):
        for mode in rows:
            rows[mode].append(run(experts, groups, weights, mode == "reuse"))
    print(f"one merge layer: {a.experts} experts [I={a.width}, H={a.hidden}] bf16, {a.pairs} aligned pairs, "
          f"1 thread, median of {a.repeats}\n")
    print("| memory | seconds | minor faults | system s |\n|---|---:|---:|---:|")
    for mode, rs in rows.items():
        s, f, sy = (statistics.median(x) for x in zip(*rs, strict=True))
        print(f"| {mode} | {s:.2f} | {f / 1e3:.0f} k | {sy:.2f} |")
    ratio = statistics.median(r[0] for r in rows["fixed"]) / statistics.median(r[0] for r in rows["reuse"])
    print(f"\nreuse is {ratio:.2f}x as fast")


if __name__ == "__main__":
    main()

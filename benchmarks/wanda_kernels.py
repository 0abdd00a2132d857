"""Benchmark: wanda's per-matrix kernels (`sparsity/wanda.py`) of this tree against those of an earlier revision.

Both versions of the module are imported into one process (the old one from `git show REV:...`) and timed in
alternation, round by round, on the same matrices: the gate, up [I, H] and down [H, I] of `--experts` random bf16
experts with random input norms, one thread. Each round times every matrix once per kernel:

    mask    wanda_mask(W, in_sq, "unstructured", 0.5)
    count   outlier_count(W, in_sq, θ), θ = M × the mean score of the matrices (M = 5, OWL's default)
    mass    score_mass(W, in_sq)

It prints min / median ms per matrix of each kernel, old and new, and fails if any mask or count differs.

    OMP_NUM_THREADS=1 python benchmarks/wanda_kernels.py --rev 23eb834
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from moeprune.io.memory import reuse_freed_memory
from moeprune.sparsity import wanda as new

ROOT = Path(__file__).resolve().parents[1]


def old_module(rev: str):
    """The revision's `sparsity/wanda.py`, imported under another name."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/moeprune/sparsity/wanda.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "wanda_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("wanda_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the revision to compare with (e.g. 23eb834)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=448)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    old = old_module(a.rev)
    g = torch.Generator().manual_seed(0)
    mats = []
    for _ in range(a.experts):
        for shape in ((a.width, a.hidden), (a.width, a.hidden), (a.hidden, a.width)):  # gate, up, down
            w = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
            mats.append((w, torch.rand(shape[1], dtype=torch.float64, generator=g) + 0.1))
    mass, n = map(sum, zip(*(new.score_mass(w, sq) for w, sq in mats), strict=True))
    theta = 5 * mass / n
    kernels = {"mask": lambda m, w, sq: m.wanda_mask(w, sq, "unstructured", 0.5),
               "count": lambda m, w, sq: m.outlier_count(w, sq, theta),
               "mass": lambda m, w, sq: m.score_mass(w, sq)}
    with reuse_freed_memory(16 * a.width * a.hidden):  # as the stage runs them (`stages/sparsity.py`)
        for w, sq in mats:  # the same answers first
            if not torch.equal(old.wanda_mask(w, sq, "unstructured", 0.5), new.wanda_mask(w, sq, "unstructured", 0.5)):
                raise SystemExit("the masks differ")
            if old.outlier_count(w, sq, theta) != new.outlier_count(w, sq, theta):
                raise SystemExit("the outlier counts differ")
        times = {(k, v): [] for k in kernels for v in ("old", "new")}
        for _ in range(a.rounds):
            for k, f in kernels.items():
                for v, m in (("old", old), ("new", new)):
                    t = time.perf_counter()
                    for w, sq in mats:
                        f(m, w, sq)
                    times[(k, v)].append((time.perf_counter() - t) / len(mats) * 1e3)
    print(f"{a.experts} experts' gate, up [{a.width}, {a.hidden}] and down [{a.hidden}, {a.width}], bf16, one "
          f"thread, {a.rounds} rounds alternated; old = {a.rev}\n")
    print("| kernel | old min / median ms | new min / median ms | new / old (median) |\n|---|---|---|---|")
    for k in kernels:
        o, m = times[(k, "old")], times[(k, "new")]
        print(f"| {k} | {min(o):.2f} / {statistics.median(o):.2f} | {min(m):.2f} / {statistics.median(m):.2f} | "
              f"{statistics.median(m) / statistics.median(o):.2f} |")


if __name__ == "__main__":
    main()

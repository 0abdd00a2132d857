"""Benchmark: `analyze`'s routing-locality statistics (`analysis/locality.locality`: SRP and the SCH curve per layer
and segment length, on the traces and on shuffled copies) of this tree, against an earlier revision's.

The traces are synthetic, shaped like the big-model benchmark's calibration (`benchmarks/big_model.py`: 16 windows
of 256 tokens, 24 layers, 128 experts, top-8): each token keeps its predecessor's experts with probability
`--stick`, else draws k new ones, so the statistics have some locality to find. With `--rev`, the revision's
`analysis/lrc.py` and `analysis/locality.py` are imported into this process under other names (the old locality
module reading the old lrc) and timed in alternation with this tree's, round by round on the same traces; the
results must be equal (the script fails otherwise).

    OMP_NUM_THREADS=1 python benchmarks/locality_cost.py --rev b60cc16
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeprune.analysis import locality as new

ROOT = Path(__file__).resolve().parents[1]


def _load(rev: str, rel: str, name: str, replace: tuple[str, str] | None = None):
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/moeprune/analysis/{rel}"], check=True,
                          capture_output=True, text=True).stdout
    if replace is not None:
        if replace[0] not in text:
            raise SystemExit(f"{rev}:{rel} does not import what this script replaces ({replace[0]!r})")
        text = text.replace(*replace)
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def old_locality(rev: str):
    """The revision's locality module, reading the revision's lrc module."""
    _load(rev, "lrc.py", "lrc_old")
    return _load(rev, "locality.py", "locality_old",
                 ("from moeprune.analysis.lrc import", "from lrc_old import"))


def traces(layers: int, seqs: int, tokens: int, experts: int, k: int, stick: float, seed: int = 0):
    """{set: {layer: [idx [tokens, k]] per sequence}} and the per-layer counts [E]."""
    g = torch.Generator().manual_seed(seed)
    out: dict[int, list[torch.Tensor]] = {}
    for layer in range(layers):
        out[layer] = []
        for _ in range(seqs):
            fresh = torch.rand(tokens, experts, generator=g).topk(k, dim=1).indices  # [T, k]
            keep = torch.rand(tokens, generator=g) < stick  # [T]
            rows = [fresh[0]]
            for t in range(1, tokens):
                rows.append(rows[-1] if keep[t] else fresh[t])
            out[layer].append(torch.stack(rows))  # [T, k]
    counts = {layer: torch.bincount(torch.cat(v).flatten(), minlength=experts) for layer, v in out.items()}
    return {"web": out}, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", help="a revision to compare with (e.g. b60cc16)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--stick", type=float, default=0.5)
    ap.add_argument("--lengths", default="4,16,64,256")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    lengths = [int(v) for v in a.lengths.split(",")]
    data, counts = traces(a.layers, a.seqs, a.tokens, a.experts, a.top_k, a.stick)
    layers = list(range(a.layers))
    kernels = {"new": new.locality}
    if a.rev:
        kernels = {"old": old_locality(a.rev).locality, **kernels}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    results = {}
    for _ in range(a.rounds):
        for name, fn in kernels.items():
            t = time.perf_counter()
            results[name] = fn(data, counts, layers, a.experts, a.top_k, lengths)
            times[name].append(time.perf_counter() - t)
    if a.rev and results["old"] != results["new"]:
        raise SystemExit("the revision's locality statistics differ from this tree's")
    print(f"locality statistics: {a.layers} layers x {a.seqs} sequences x {a.tokens} tokens, E = {a.experts}, "
          f"k = {a.top_k}, lengths {lengths}, {new.N_SHUFFLES} shuffles within and across; {a.rounds} rounds")
    print("| tree | min s | median s |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.2f} | {statistics.median(ts):.2f} |")
    if a.rev:
        print(f"old / new (median): {statistics.median(times['old']) / statistics.median(times['new']):.2f}; "
              "results equal")


if __name__ == "__main__":
    main()

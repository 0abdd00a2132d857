"""Do neuron scores predict the real loss change of removing a neuron? (testbed, HEAPr and CAMERA-P)

    python benchmarks/neuron_fidelity.py [--testbed DIR] [--neurons 96] [--samples 16]

Collects neuron statistics on the testbed's calibration text (forward + backward for HEAPr), then for a seeded
sample of (layer, expert, neuron) removes each neuron alone (zeroes its down-projection column) and measures the
increase of the summed NLL on the same windows. Prints Spearman's rank correlation of each score with the true
increase, plus HEAPr's collection time and peak memory (RSS high-water mark, and the size of the statistics).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
from moeprune.calibration.run import load_tokenizer
from moeprune.criteria.neurons import neuron_scores
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.stats.neurons import collect_neuron_stats, summed_nll
from moeprune.testbed import build_testbed


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def total_nll(model, sets) -> float:
    return sum(float(summed_nll(model(input_ids=s.input_ids[i:i + 8], attention_mask=s.attention_mask[i:i + 8]).logits,
                                s.input_ids[i:i + 8], s.attention_mask[i:i + 8]))
               for s in sets for i in range(0, s.input_ids.shape[0], 8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed")
    ap.add_argument("--neurons", type=int, default=192, help="neurons removed one at a time")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows per domain")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tb = build_testbed(args.testbed)
    tok = load_tokenizer(tb.path, None)
    sources = tuple(CalibSource(n, p) for n, p in tb.data("calib").items())
    sets = build_sets(CalibConfig(sources, samples=args.samples, seq_len=tb.seq_len, warn_short=False), tok)
    model = load_model(tb.path, dtype="float32")
    adapter = get_adapter(model.config, model=model)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    stats = collect_neuron_stats(model, adapter, sets, gradients=True)
    heapr_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stat_bytes = sum(t.numel() * t.element_size() for s in stats.values() for t in s.sums.values())
    scores = {"heapr": neuron_scores("heapr", stats), "camera": neuron_scores("camera", stats)}
    base = total_nll(model, sets)
    g = torch.Generator().manual_seed(args.seed)
    layers = sorted(stats)
    E, I = next(iter(stats.values())).sums["act_sq"].shape
    picks = [(layers[int(torch.randint(len(layers), (1,), generator=g))], int(torch.randint(E, (1,), generator=g)),
              int(torch.randint(I, (1,), generator=g))) for _ in range(args.neurons)]
    deltas = []
    for layer, j, k in picks:
        down = adapter.experts(adapter.block(model, layer)).down_proj  # [E, H, I]
        saved = down.data[j, :, k].clone()
        down.data[j, :, k] = 0
        deltas.append(total_nll(model, sets) - base)
        down.data[j, :, k] = saved
    true = torch.tensor(deltas, dtype=torch.float64)
    print(f"testbed {tb.path}: {sum(s.input_ids.shape[0] for s in sets)} windows x {tb.seq_len} tokens; "
          f"{len(picks)} single-neuron removals; base summed NLL {base:.1f}")
    print("| score | Spearman ρ vs ΔNLL | Spearman ρ vs abs(ΔNLL) | mean ΔNLL, top quarter by score | "
          "mean ΔNLL, bottom quarter |\n|---|---:|---:|---:|---:|")
    q = max(1, len(picks) // 4)
    rand = torch.rand(len(picks), generator=g, dtype=torch.float64)
    for name, est in [(n, torch.tensor([float(sc[layer][j, k]) for layer, j, k in picks], dtype=torch.float64))
                      for n, sc in scores.items()] + [("random (control)", rand)]:
        order = est.argsort(descending=True)
        print(f"| {name} | {spearman(est, true):.3f} | {spearman(est, true.abs()):.3f} | "
              f"{true[order[:q]].mean():.3f} | {true[order[-q:]].mean():.3f} |")
    print(f"\nΔNLL over the {len(picks)} removals: mean {true.mean():.3f}, {int((true < 0).sum())} negative "
          "(removal helped: first-order effects of a model that is not at a minimum)")
    print(f"\nHEAPr statistics: {heapr_s:.1f} s (forward + backward over the windows); statistics "
          f"{stat_bytes / 2**20:.2f} MiB ({len(layers)} layers x {E} experts x {I} neurons x 5 float64 sums + "
          f"counts); peak RSS {rss0 / 1024:.0f} MiB before -> {rss1 / 1024:.0f} MiB after collection")
    return 0


if __name__ == "__main__":
    sys.exit(main())

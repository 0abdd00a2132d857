"""The offloading simulation of a model's routing traces: every policy at every cache size, the predictor's accuracy,
time per token, and the verdict against static pruning.

Streams. Per MoE layer the test traces (whole sequences round-robin over the sets, at most `locality.MAX_TOKENS`
tokens: `locality.budget`) are concatenated into one serving stream [T, k], the same tokens in every layer. Each
layer has its own cache of m experts (offload/cache.py); the timing model (offload/timing.py) sums the layers.

Policies (`POLICIES`; all demand-load what is missing, evicting as named):

    lru, lfu, belady   demand paging only (belady: the optimal offline bound on bytes moved)
    predictive         at every MoE layer but the first, prefetch the transition predictor's p best guesses from
                       the token's routing at the layer before (offload/predictor.py), LRU eviction; the first
                       MoE layer has no predecessor and runs plain LRU
    lookahead          the same with layer ℓ's router applied to layer ℓ−1's block input (offload/lookahead.py;
                       only when its guesses are given)
    oracle             the same with perfect guesses (the true next-layer experts): the ceiling of prefetching

Relation to SCH(L, m) of the locality section (analysis/lrc.py). SCH fixes a cache per L-token segment with
look-ahead over the segment and counts no transfer when the set changes between segments, so SCH(1, m ≥ k) = 1
while Belady pays every load; and Belady, unlike a static set, must hold each token's own k experts (no bypass),
so neither bounds the other. `sch` in the result holds SCH(16, m) on the same test traces for comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from moeprune.analysis.locality import MAX_TOKENS, TARGET_LENGTH, budget
from moeprune.analysis.lrc import sch_curve
from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.offload.cache import CacheRun, simulate
from moeprune.offload.options import OffloadOptions
from moeprune.offload.predictor import TransitionPredictor, accuracy, oracle
from moeprune.offload.timing import TimingModel
from moeprune.registry import Registry

Traces = dict[str, dict[int, list[torch.Tensor]]]  # set -> MoE layer -> [T_i, k] per sequence
REALIZABLE = ("lru", "lfu", "predictive", "lookahead")  # policies a server can run (belady and oracle need the future)


@dataclass
class Streams:
    """The test stream of every layer and what the prefetching policies guess for it."""

    layers: list[int]
    requests: list[torch.Tensor]  # per layer [T, k]
    num_experts: int
    guesses: list[torch.Tensor | None]  # per layer [T, p] from the predictor (None for the first layer)
    truth: list[torch.Tensor | None]  # per layer [T, p] oracle guesses
    ahead: list[torch.Tensor | None] | None = None  # per layer [T, p] router look-ahead guesses


POLICIES: Registry[Callable[[Streams, int, int], CacheRun]] = Registry("offloading policy")
for _rule in ("lru", "lfu", "belady"):
    POLICIES.register(_rule, lambda s, i, m, rule=_rule: simulate(s.requests[i], s.num_experts, m, rule))
POLICIES.register("predictive", lambda s, i, m: simulate(s.requests[i], s.num_experts, m, "lru", s.guesses[i]))
POLICIES.register("oracle", lambda s, i, m: simulate(s.requests[i], s.num_experts, m, "lru", s.truth[i]))
POLICIES.register("lookahead", lambda s, i, m: simulate(s.requests[i], s.num_experts, m, "lru", s.ahead[i]))
ORDER = ("lru", "lfu", "predictive", "lookahead", "oracle", "belady")


def streams_of(traces: Traces, layers: Sequence[int]) -> dict[int, list[torch.Tensor]]:
    """layer -> the budgeted sequences (same choice in every layer)."""
    return {layer: budget([by_layer[layer] for by_layer in traces.values()], MAX_TOKENS) for layer in layers}


def split(traces: Traces) -> tuple[Traces, Traces]:
    """(even-numbered sequences of each set, odd-numbered ones): training and test traces without held-out text."""
    part = lambda r: {s: {la: seqs[r::2] for la, seqs in by.items()} for s, by in traces.items()}  # noqa: E731
    return part(0), part(1)


def simulate_offload(train: Traces, test: Traces, layers: Sequence[int], num_experts: int, top_k: int,
                     timing: TimingModel, opts: OffloadOptions, heldout: str = "heldout",
                     lookahead: Traces | None = None) -> dict[str, Any]:
    """Every policy × cache size on the test traces (module docstring); the result is plain JSON data.
    `lookahead`: router look-ahead guesses per set and layer (all MoE layers but the first), aligned with `test`."""
    layers = list(layers)
    sizes = opts.sizes(top_k, num_experts)
    p = opts.prefetch_count(top_k, sizes[0])
    if timing.moe_layers != len(layers):
        raise MoePruneError(f"the timing model has {timing.moe_layers} MoE layers, the traces {len(layers)}.")
    test_seqs = streams_of(test, layers)
    train_seqs = {la: [t for by in train.values() for t in by[la]] for la in layers}
    if not test_seqs[layers[0]] or not train_seqs[layers[0]]:
        raise MoePruneError("the offloading simulation needs training and test traces; give more text.")
    predictor = TransitionPredictor.train(train_seqs, layers, num_experts)
    requests = [torch.cat(test_seqs[la]) for la in layers]  # [T, k] per layer
    guesses: list[torch.Tensor | None] = [None] + [predictor.predict(la, requests[i], p)
                                                   for i, la in enumerate(layers[1:])]
    truth: list[torch.Tensor | None] = [None] + [oracle(r, p) for r in requests[1:]]
    streams = Streams(layers, requests, num_experts, guesses, truth)
    acc = [accuracy(g, r) for g, r in zip(guesses[1:], requests[1:], strict=True)]
    policies = [n for n in ORDER if n != "lookahead" or lookahead is not None]
    ahead_acc = None
    if lookahead is not None:
        seqs = streams_of(lookahead, layers[1:])
        streams.ahead = [None] + [oracle(torch.cat(seqs[la]), p) for la in layers[1:]]
        for i, g in enumerate(streams.ahead[1:], start=1):
            if g.shape[0] != requests[i].shape[0]:
                raise MoePruneError(f"look-ahead guesses for layer {layers[i]} cover {g.shape[0]} tokens, the test "
                                    f"stream {requests[i].shape[0]}; pass guesses from the same pass.")
        ahead_acc = [accuracy(g, r) for g, r in zip(streams.ahead[1:], requests[1:], strict=True)]
    rows = []
    for m, name in tqdm([(m, n) for m in sizes for n in policies], desc="offloading simulation", leave=False):
        runs = [POLICIES.get(name)(streams, i, m) for i in range(len(layers))]
        rows.append(_row(name, m, runs, timing))
    T = requests[0].shape[0]
    result = {
        "cache_sizes": sizes, "policies": policies, "prefetch": p, "tokens": T, "heldout": heldout,
        "train_tokens": sum(t.shape[0] for t in train_seqs[layers[0]]),
        "timing": {"bandwidth_gbs": timing.bandwidth, "tflops": timing.tflops, "expert_bytes": timing.expert_bytes,
                   "expert_params": timing.expert_params, "other_params": timing.other_params,
                   "compute_s": timing.compute_s, "transfer_s": timing.transfer_s, "resident_s": timing.resident_s},
        "predictor": {"kind": "transition", "layers": layers[1:], "recall": [a["recall"] for a in acc],
                      "precision": [a["precision"] for a in acc],
                      "mean_recall": sum(a["recall"] for a in acc) / max(1, len(acc)),
                      "mean_precision": sum(a["precision"] for a in acc) / max(1, len(acc))},
        "lookahead": None if ahead_acc is None else {
            "kind": "router look-ahead", "layers": layers[1:], "recall": [a["recall"] for a in ahead_acc],
            "precision": [a["precision"] for a in ahead_acc],
            "mean_recall": sum(a["recall"] for a in ahead_acc) / max(1, len(ahead_acc)),
            "mean_precision": sum(a["precision"] for a in ahead_acc) / max(1, len(ahead_acc))},
        "rows": rows,
        "sch": {"length": TARGET_LENGTH, "values": _sch(test_seqs, layers, num_experts, sizes)},
        "static_quality": {str(r): q for r, q in sorted(opts.static_quality.items())},
        "quality_target": opts.quality_target,
    }
    result["verdict"] = verdict(result, timing, num_experts)
    logger.info("offloading: %s", result["verdict"]["text"])
    return result


def _row(name: str, m: int, runs: list[CacheRun], timing: TimingModel) -> dict[str, Any]:
    demand = torch.stack([r.demand for r in runs])  # [n, T]
    pre = torch.stack([r.prefetch for r in runs])  # [n, T]
    time = float(timing.token_times(demand, pre).mean())
    loads = float((demand + pre).sum(0).double().mean())  # experts moved per token, all layers
    hits = sum(float(r.hits.sum()) for r in runs)
    return {"policy": name, "m": m, "hit_rate": hits / sum(r.hits.numel() * r.k for r in runs),
            "hit_rate_per_layer": [r.hit_rate for r in runs], "loads_per_token": loads,
            "bytes_per_token": loads * timing.expert_bytes, "time_s": time, "slowdown": time / timing.resident_s,
            "memory_bytes": timing.memory(m), "realizable": name in REALIZABLE}


def _sch(seqs: dict[int, list[torch.Tensor]], layers: list[int], E: int, sizes: list[int]) -> list[float | None]:
    """Mean over layers of SCH(TARGET_LENGTH, m) on the test traces, per cache size (None: sequences too short)."""
    if max(t.shape[0] for t in seqs[layers[0]]) < TARGET_LENGTH:
        return [None] * len(sizes)
    curves = [sch_curve([t for t in seqs[la] if t.shape[0] > 0], E, TARGET_LENGTH) for la in layers]  # [E] each
    return [sum(float(c[m - 1]) for c in curves) / len(curves) for m in sizes]


def verdict(res: dict[str, Any], timing: TimingModel, E: int) -> dict[str, Any]:
    """Offloading (all experts, quality ×1) against static pruning (static_quality) for the quality target."""
    target, table = res["quality_target"], {float(r): q for r, q in res["static_quality"].items()}
    best = {}
    for m in res["cache_sizes"]:
        best[m] = min((r for r in res["rows"] if r["m"] == m and r["realizable"]), key=lambda r: r["time_s"])
    mb = lambda n: f"{timing.memory(n) / 2**20:.2f} MiB"  # noqa: E731
    offload = "; ".join(f"m = {m} ({mb(m)}): {r['policy']} ×{r['slowdown']:.2f} time per token "
                        f"({r['time_s'] * 1e6:.3g} µs, hit rate {r['hit_rate']:.1%})" for m, r in best.items())
    head = (f"Offloading keeps every expert (perplexity ×1.000) with m resident experts per layer; best realizable "
            f"policy per cache size: {offload}; all experts resident: {timing.resident_s * 1e6:.3g} µs per token "
            f"({mb(E)}).")
    if not table:
        decision = "Pass the static pruning quality (--static-quality RATIO=PPL_RATIO,...) to compare with it."
        return {"kind": "no-static-quality", "text": f"{head} {decision}", "head": head, "decision": decision,
                "best": _best(best)}
    meets = [r for r in sorted(table) if table[r] <= target]
    if meets:
        r_s = max(meets)
        kept = (1 - r_s) * E
        static = (f"Static pruning meets ×{target:g} at ratio {r_s:g} (×{table[r_s]:.3f}) with {kept:g} experts per "
                  f"layer ({mb(kept)}) and no transfers")
    else:
        r_s, kept = None, float(E)
        static = (f"No static ratio given ({', '.join(f'{r:g}: ×{q:.3f}' for r, q in sorted(table.items()))}) meets "
                  f"×{target:g}; only the full model ({mb(E)}) or offloading does")
    smaller = [m for m in best if m < kept]
    fallback = "static pruning wins (full speed)" if r_s is not None else "the unpruned model fits (full speed)"
    if smaller:
        m = smaller[-1]
        decision = (f"{static}. For perplexity ×{target:g}: below {mb(kept)} of expert memory offloading wins "
                    f"(static pruning cannot meet the target there), e.g. m = {m} ({mb(m)}) at "
                    f"×{best[m]['slowdown']:.2f} time per token; at {mb(kept)} or more {fallback}.")
        kind = "offload"
    else:
        decision = (f"{static}. Every simulated cache is at least that large, so static pruning wins for "
                    f"×{target:g}: the same memory, full speed.")
        kind = "static"
    return {"kind": kind, "text": f"{head} {decision}", "head": head, "decision": decision, "static_ratio": r_s,
            "static_experts": kept, "static_memory_bytes": timing.memory(kept), "best": _best(best)}


def _best(best: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"m": m, "policy": r["policy"], "slowdown": r["slowdown"], "time_s": r["time_s"]} for m, r in best.items()]

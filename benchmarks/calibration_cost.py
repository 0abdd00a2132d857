"""Benchmark: cost of moeprune calibration (all routed statistics) against a plain forward and a dense observer.

What is measured (same model, same tokens, same batches)
    A random qwen3_moe model from `moeprune.tiny.tiny_config` scaled so the routed experts dominate the compute
    as in real MoEs (defaults: H=1024, expert width 512, 32 experts, top-4, 16x64 query / 4x64 kv heads, 4 layers,
    every layer MoE, vocab 1024; active experts are 71% of the per-token weights, 67% in Qwen3-30B-A3B).
    N random sequences of L tokens, fed in batches of B rows:
      (a)   plain     model(input_ids, attention_mask, use_cache=False) under no_grad, with the model's default
                      experts implementation (transformers 5: `grouped_mm`);
      (a')  eager     the same with `config._experts_implementation = "eager"` (the per-expert loop that
                      calibration forces, so (b)/(a') isolates the statistics overhead from the kernel choice);
      (b)   moeprune  `moeprune.calibration.session.collect(model, adapter, [CalibSet], batch_size=B)`: the
                      layer-by-layer engine with a RoutedCollector on every MoE block (every statistic);
      (c)   dense     the REAP-reference way: one whole-model forward per batch in which every MoE block runs EVERY
                      expert on EVERY token (eager SwiGLU math on `adapter.expert_roles(block)`), keeps f_j(t) for the
                      routed (token, slot) pairs and feeds them with the router's logits into the very same
                      `RoutedStats.update`; the block returns Σ g·f of the routed experts, so later layers see the
                      normal hidden states. Same statistics work, experts computed densely (E/k times the FLOPs).
    Repetitions alternate the order of the methods (rotating), after one untimed warm-up of each. Wall and CPU
    time (process_time) are medians over repetitions; ratios are taken per repetition (methods measured minutes
    apart on a shared machine are not compared) and their median is reported with the least disturbed
    repetition's. torch runs 1 intra-op thread by default (--threads): on a shared 2-core machine a descheduled
    OpenMP thread makes the other spin, which inflated wall AND CPU time up to 8x at random in trials; with one
    thread CPU time is close to contention-free. "stats update" = time inside `RoutedStats.update` (wrapped here
    by the benchmark, not edited).
    (c) is checked against (b): every statistic must agree to float rounding.
    (a) and (b) use the model's default experts kernel (grouped_mm): calibration runs the implementation the model
    is configured with; (b') forces the per-expert eager loop.

    Peak host memory of `collect` (2 vs 8 decoder layers, eager and lazy loading): `calibration_rss.py`.

    (b') is (b) with `eager=True`: the per-expert reference loop, (b')/(a') its statistics overhead alone.

Target (issue): (b)/(a) <= 1.15 on CPU, for the default and the `--preset small` model; lazy peak RSS flat in
depth.

Run:  python benchmarks/calibration_cost.py [--preset default|small] [--repeats 5] [--layers 4] [--seqs 8]
          [--seq-len 256] [--batch 4] [--threads 1] [--rss-layers 2 8] [--no-rss] [--profile] [--json out.json]
          [--device cuda --sync-check]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the engine's progress bar would pollute the table


PRESETS = {
    # the default: experts dominate the compute as in real MoEs
    "default": dict(hidden=1024, expert_width=512, experts=32, top_k=4, head_dim=64, heads=0, kv_heads=0, vocab=1024,
                    layers=4, seqs=8, seq_len=256, batch=4),
    # a user's case: the testbed's shape (3.6 M parameters) with 32 experts top-4 of width 64, 4 x 64 windows of
    # 256 tokens in batches of 8 (calibrate's default); per-op overhead, not FLOPs, dominates at this size
    "small": dict(hidden=128, expert_width=64, experts=32, top_k=4, head_dim=32, heads=4, kv_heads=2, vocab=2048,
                  layers=4, seqs=256, seq_len=256, batch=8),
}


def shape(args: argparse.Namespace, layers: int) -> dict:
    """tiny_config overrides for qwen3_moe at the benchmark size (heads 0: H/64 query and H/256 kv heads)."""
    heads = args.heads or args.hidden // args.head_dim
    kv = args.kv_heads or max(1, args.hidden // (4 * args.head_dim))
    return dict(hidden_size=args.hidden, moe_intermediate_size=args.expert_width, intermediate_size=2 * args.hidden,
                num_experts=args.experts, num_experts_per_tok=args.top_k, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=args.head_dim, vocab_size=args.vocab,
                max_position_embeddings=max(1024, args.seq_len), num_hidden_layers=layers, mlp_only_layers=[])


def tokens(n: int, length: int, vocab: int):
    """Seeded random token ids [n, length] and an all-ones mask, wrapped as a CalibSet."""
    import torch

    from moeprune.calibration.data import CalibSet

    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))  # [N, L]
    mask = torch.ones_like(ids)  # [N, L]
    return CalibSet("bench", ids, mask, "", "random", 1, ids.numel())


# ----------------------------------------------------------------------------------------- the three methods
def plain(model, cs, batch: int, impl: str | None = None) -> None:
    """(a) / (a'): whole-model forward, batch by batch; `impl` overrides the experts implementation."""
    import torch

    before = model.config._experts_implementation
    if impl is not None:
        model.config._experts_implementation = impl
    try:
        with torch.no_grad():
            for s in range(0, cs.input_ids.shape[0], batch):
                model(input_ids=cs.input_ids[s : s + batch], attention_mask=cs.attention_mask[s : s + batch],
                      use_cache=False)
    finally:
        model.config._experts_implementation = before


def dense(model, adapter, cs, batch: int) -> dict:
    """(c): every MoE block runs every expert on every token; the same RoutedStats as (b). Returns layer -> stats."""
    import torch
    import torch.nn.functional as F

    from moeprune.calibration.session import eager_experts
    from moeprune.stats.routed import RoutedStats, router_probs

    E, kind = adapter.num_experts, adapter.routing().kind
    device = next(model.parameters()).device
    stats = {i: RoutedStats(E).to(device) for i in adapter.moe_layers()}
    state: dict = {"valid": None}
    undo = []

    def observer(i: int, experts, roles: dict):
        logits: dict = {}

        def keep(module, args, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            logits["l"] = out.detach().reshape(-1, E)  # [T, E]

        def forward(x, top_k_index, top_k_weights, *args, **kwargs):  # x [T, H]; index, weights [T, k]
            T, k = top_k_index.shape
            f = x.new_empty(T, k, x.shape[-1])  # [T, k, H]: f_j(t) of the routed pairs
            for j in range(E):
                g = F.linear(x, roles["gate"][j], roles["gate_bias"][j] if "gate_bias" in roles else None)
                u = F.linear(x, roles["up"][j], roles["up_bias"][j] if "up_bias" in roles else None)
                y = F.linear(experts.act_fn(g) * u, roles["down"][j],
                             roles["down_bias"][j] if "down_bias" in roles else None)  # [T, H]: expert j, all tokens
                t, slot = torch.where(top_k_index == j)
                f[t, slot] = y[t]
            probs = router_probs(logits.pop("l"), kind)  # [T, E]
            stats[i].update(top_k_index, top_k_weights.detach(), f, state["valid"], x, probs)
            return (f * top_k_weights[..., None].to(f.dtype)).sum(dim=1)  # [T, H]

        return keep, forward

    try:
        for i in adapter.moe_layers():
            block = adapter.block(model, i)
            experts = adapter.experts(block)
            keep, forward = observer(i, experts, adapter.expert_roles(block))
            undo.append(adapter.router(block).register_forward_hook(keep).remove)
            experts.forward = forward
            undo.append(lambda e=experts: delattr(e, "forward"))
        with torch.no_grad(), eager_experts(model):
            for s in range(0, cs.input_ids.shape[0], batch):
                mask = cs.attention_mask[s : s + batch]  # [B, L]
                state["valid"] = mask.reshape(-1).bool().to(device)  # [T]
                model(input_ids=cs.input_ids[s : s + batch], attention_mask=mask, use_cache=False)
    finally:
        for u in reversed(undo):
            u()
    return {i: st.to("cpu") for i, st in stats.items()}


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference over every routed statistic of every layer (a, b: layer -> RoutedStats); the
    merge-grouping sums (logit Gram, probe outputs) are collected by (b) only."""
    from moeprune.stats.routed import GROUPING_FIELDS

    worst = 0.0
    for i in a:
        for name, x in a[i].sums.items():
            if name in GROUPING_FIELDS:
                continue
            y = b[i].sums[name]
            worst = max(worst, float(((x - y).abs() / y.abs().clamp_min(1e-12)).max()))
    return worst


# ----------------------------------------------------------------------------------------- timing (in process)
def timing(args: argparse.Namespace) -> dict:
    import torch

    from moeprune.calibration.session import collect
    from moeprune.models import get_adapter
    from moeprune.stats import routed
    from moeprune.tiny import tiny_model

    device = args.device
    model = tiny_model("qwen3_moe", seed=0, **shape(args, args.layers)).to(device)
    adapter = get_adapter(model.config)
    cs = tokens(args.seqs, args.seq_len, args.vocab)
    if device != "cpu":
        cs.input_ids, cs.attention_mask = cs.input_ids.to(device), cs.attention_mask.to(device)

    in_update = [0.0]
    original_update = routed.RoutedStats.update

    def timed_update(self, *a, **kw):
        t = time.perf_counter()
        try:
            return original_update(self, *a, **kw)
        finally:
            in_update[0] += time.perf_counter() - t

    methods = {
        "a": lambda: plain(model, cs, args.batch),
        "a_eager": lambda: plain(model, cs, args.batch, "eager"),
        "b": lambda: collect(model, adapter, [cs], device=device, batch_size=args.batch),
        "b_1probe": lambda: collect(model, adapter, [cs], device=device, batch_size=args.batch,
                                    probe_stride=10**9),  # probes on the first token of each row only
        "b_eager": lambda: collect(model, adapter, [cs], device=device, batch_size=args.batch, eager=True),
        "c": lambda: dense(model, adapter, cs, args.batch),
    }
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    routed.RoutedStats.update = timed_update
    try:
        res_b, res_c = methods["b"]().stats["bench"], methods["c"]()  # warm-up, and (c) == (b) check
        diff = max_rel_diff(res_c, res_b)
        methods["a"](), methods["a_eager"]()
        order = list(methods)
        for rep in range(args.repeats):
            for m in order[rep % len(order):] + order[: rep % len(order)]:  # rotate the order every repetition
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                in_update[0] = 0.0
                w, c = time.perf_counter(), time.process_time()
                methods[m]()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                w, c = time.perf_counter() - w, time.process_time() - c
                peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
                runs[m].append({"wall": w, "cpu": c, "update": in_update[0], "device_peak": peak})
                print(f"  rep {rep + 1} {m}: {w:.2f}s wall, {c:.2f}s cpu", file=sys.stderr)
        profile = profile_b(methods["b"], args) if args.profile else None
    finally:
        routed.RoutedStats.update = original_update
    return {"runs": runs, "diff": diff, "profile": profile,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def sync_check(args: argparse.Namespace) -> str:
    """CUDA only: one (b) run with the statistics code (RoutedStats.update, update_grouping, the collector's probe
    indices) under torch.cuda.set_sync_debug_mode("error"): any host-device sync there raises. The engine's own
    per-batch copies of activations to and from the host are outside the checked code (they are the design)."""
    import torch

    from moeprune.calibration.session import collect
    from moeprune.models import get_adapter
    from moeprune.stats import routed
    from moeprune.tiny import tiny_model

    # as `calibrate` runs it: model and token ids on the host, each decoder layer moved to the device in turn
    model = tiny_model("qwen3_moe", seed=0, **shape(args, args.layers))
    cs = tokens(args.seqs, args.seq_len, args.vocab)
    originals = {name: getattr(routed.RoutedStats, name) for name in ("update", "update_grouping")}
    originals["_probe_rows"] = routed.RoutedCollector._probe_rows

    def strict(fn):
        def run(*a, **kw):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    try:
        for name, fn in originals.items():
            setattr(routed.RoutedCollector if name == "_probe_rows" else routed.RoutedStats, name, strict(fn))
        collect(model, get_adapter(model.config), [cs], device=args.device, batch_size=args.batch)
        return "no host-device sync in the statistics code (update, update_grouping, probe indices)"
    except RuntimeError as e:
        import traceback

        where = "".join(traceback.format_exception(e)[-6:])
        return f"FAILED in the statistics code ({'sync' if 'synchroniz' in str(e) else 'error'}): {e}\n{where}"
    finally:
        for name, fn in originals.items():
            setattr(routed.RoutedCollector if name == "_probe_rows" else routed.RoutedStats, name, fn)


def profile_b(run_b, args: argparse.Namespace) -> str:
    """Top operators of one (b) run by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run_b()
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20)


# ----------------------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="model and data size; the flags below override single values")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--expert-width", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--heads", type=int, help="query heads (0: hidden / head-dim)")
    ap.add_argument("--kv-heads", type=int, help="key/value heads (0: hidden / (4 head-dim))")
    ap.add_argument("--layers", type=int, help="decoder layers of the timed model")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--seqs", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared machine OpenMP spin-waits of a descheduled thread "
                         "inflate both wall and CPU time unpredictably)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model and tokens go there)")
    ap.add_argument("--rss-layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess runs")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one (b) run")
    ap.add_argument("--sync-check", action="store_true",
                    help="with --device cuda: run the statistics code under torch.cuda.set_sync_debug_mode('error')")
    ap.add_argument("--json", type=Path, help="dump the numbers here")
    args = ap.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import logging

    import torch

    logging.getLogger("moeprune").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    try:
        import moeprune.io.lazy  # noqa: F401
        lazy_ok = True
    except ImportError:
        lazy_ok = False

    sh = shape(args, args.layers)
    print(f"qwen3_moe via tiny_config: {json.dumps(sh)}", file=sys.stderr)
    if args.sync_check:
        if not args.device.startswith("cuda"):
            sys.exit("--sync-check needs --device cuda")
        print(f"sync check: {sync_check(args)}")
    t = timing(args)
    runs = t["runs"]
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "update")} for m, rs in runs.items()}
    best = {m: min(r["wall"] for r in rs) for m, rs in runs.items()}

    def ratio(num: str, den: str, key: str = "wall") -> float:
        return statistics.median(x[key] / y[key] for x, y in zip(runs[num], runs[den], strict=True))

    T = args.seqs * args.seq_len
    print(f"\nqwen3_moe (tiny_config): {args.layers} layers, H={args.hidden}, expert width {args.expert_width}, "
          f"{args.experts} experts top-{args.top_k}, {sh['num_attention_heads']}x{args.head_dim} q / "
          f"{sh['num_key_value_heads']}x{args.head_dim} kv heads, vocab {args.vocab}, {t['params_m']:.1f}M params, "
          "float32, "
          f"{args.device}, {torch.get_num_threads()} threads")
    print(f"{args.seqs} sequences x {args.seq_len} tokens = {T} tokens, batches of {args.batch}; "
          f"median of {args.repeats} rotating repetitions after a warm-up\n")
    names = {"a": "(a) plain forward (default experts impl)", "a_eager": "(a') plain forward, eager experts",
             "b": "(b) moeprune collect, all statistics (probes every ⌈8E/k⌉ tokens)",
             "b_1probe": "(b1) the same, one probe token per row",
             "b_eager": "(b') collect with eager=True (the per-expert loop)",
             "c": "(c) dense observer (every expert, every token)"}
    gpu = args.device.startswith("cuda")
    print("| method | wall s (median) | wall s (best) | cpu s (median) | stats update s | tokens/s | "
          "wall / (a) | cpu / (a) | wall / (a') | device peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, label in names.items():
        upd = f"{med[m]['update']:.2f}" if m in ("b", "b_1probe", "b_eager", "c") else "-"
        dev = f"{max(r['device_peak'] for r in runs[m]) / 1e6:.0f}" if gpu else "n/a (no GPU)"
        print(f"| {label} | {med[m]['wall']:.2f} | {best[m]:.2f} | {med[m]['cpu']:.2f} | {upd} | "
              f"{T / med[m]['wall']:.0f} | {ratio(m, 'a'):.2f} | {ratio(m, 'a', 'cpu'):.2f} | "
              f"{ratio(m, 'a_eager'):.2f} | {dev} |")
    rb, rc = ratio("b", "a"), ratio("c", "a")
    best_rep = min(range(args.repeats), key=lambda i: sum(runs[m][i]["wall"] for m in runs))
    rb_best = runs["b"][best_rep]["wall"] / runs["a"][best_rep]["wall"]
    print(f"\n(b)/(a) = {rb:.2f} (median of per-repetition ratios; {rb_best:.2f} in the least disturbed repetition) "
          f"target <= 1.15: {'PASS' if rb <= 1.15 else 'FAIL'}")
    print(f"(b')/(a') = {ratio('b_eager', 'a_eager'):.2f} (both with the eager per-expert loop)")
    print(f"(c)/(a) = {rc:.2f}; (c)/(b) = {ratio('c', 'b'):.2f}; (b)/(a') = {ratio('b', 'a_eager'):.2f}; "
          f"(b)/(b1) = {ratio('b', 'b_1probe'):.2f} (cost of the merge-grouping probes)")
    print(f"(c) vs (b) statistics: max relative difference {t['diff']:.1e} (same sums, computed densely)")
    if not gpu:
        print("device peak memory: n/a (no GPU)")

    rows: list[dict] = []
    if not args.no_rss:
        from calibration_rss import rss_table

        rows = rss_table(args, lazy_ok)
    if t["profile"]:
        print("\ntorch.profiler, one (b) run, top operators by self CPU time:\n")
        print(t["profile"])
    if args.json:
        args.json.write_text(json.dumps({"config": sh, "args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": runs, "ratio_b_a": rb, "ratio_c_a": rc, "stats_diff": t["diff"],
                                         "rss": rows}, indent=2))


if __name__ == "__main__":
    main()

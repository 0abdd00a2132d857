"""Eager wall time of routing policies: does dropping experts per token shorten a CPU forward?

Model: a random qwen3_moe whose routed experts dominate the forward (H=512, I=1024, E=16, top-4, 2 MoE layers),
1024 tokens, one torch thread. For each policy: median wall time of 5 forwards (interleaved with the baseline,
ratios within one run), the active experts per token (non-zero weight), the experts the experts module really
computed, and the routed-expert FLOPs ratio, under transformers' eager expert loop (which skips the dropped slots,
`models/dynamic.py`) and its grouped_mm kernel (which computes them with weight 0).

    python benchmarks/routing_walltime.py
"""

from __future__ import annotations

import statistics
import time

import torch

from moeprune.models import get_adapter
from moeprune.routing.apply import apply_routing, remove_routing, routing_report
from moeprune.routing.plan import RoutingPlan
from moeprune.tiny import tiny_model


def main() -> None:
    torch.set_num_threads(1)
    model = tiny_model("qwen3_moe", hidden_size=512, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=1024,
                       num_hidden_layers=2, mlp_only_layers=[], num_attention_heads=8, head_dim=64)
    adapter = get_adapter(model.config, model=model)
    ids = torch.randint(0, 96, (4, 256), generator=torch.Generator().manual_seed(0))  # [B, S]
    layers = adapter.moe_layers()
    plans = {"topk 2": RoutingPlan("topk", 4, layers, k=2), "topk 1": RoutingPlan("topk", 4, layers, k=1),
             "top_p 0.6": RoutingPlan("top_p", 4, layers, thresholds=dict.fromkeys(layers, 0.6), k_max=4)}

    def forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        return time.perf_counter() - start

    print(f"{'experts':<11} {'policy':<10} {'wall':>7} {'active':>7} {'computed':>9} {'FLOPs':>7}")
    for impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        forward()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in ["none", *plans]}
        reports = {}
        for _ in range(5):
            for name in times:
                if name != "none":
                    apply_routing(model, plans[name], adapter)
                times[name].append(forward())
                if name != "none":
                    reports[name] = routing_report(model, adapter)
                    remove_routing(model)
        base = statistics.median(times["none"])
        print(f"{impl:<11} {'none':<10} {base:6.3f}s {4:7.2f} {4:9.2f} {1:7.3f}")
        for name, r in reports.items():
            print(f"{impl:<11} {name:<10} x{statistics.median(times[name]) / base:5.3f} {r['active_per_token']:7.2f} "
                  f"{r['computed_per_token']:9.2f} x{r['flops_ratio']:5.3f}")


if __name__ == "__main__":
    main()

"""`moeprune demo`: the whole spine on an embedded default model, offline.

Until the trained testbed lands (issue 5) the default model is a small *random* Qwen3-MoE (16 experts, top-2)
built on the spot, so the demo shows structure, size and exactness of the exports, not quality.
"""

from __future__ import annotations

from pathlib import Path

from moeprune import api
from moeprune.log import logger
from moeprune.models.summary import format_summary
from moeprune.tiny import save_tiny

DEMO_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_experts=16, num_experts_per_tok=2,
                  moe_intermediate_size=32, mlp_only_layers=[0], vocab_size=256)


def run_demo(workdir: str | Path, method: str = "aimer") -> int:
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    original = work / "original"
    if not (original / "config.json").is_file():
        logger.info("building the demo model (random Qwen3-MoE, 16 experts, top-2) in %s", original)
        save_tiny("qwen3_moe", original, seed=0, **DEMO_MODEL)
    print(format_summary(api.info(original)))
    rows = []
    for ratio in (0.25, 0.5):
        out = work / f"{method}-{int(ratio * 100)}"
        applied, result = api.prune(original, out, method=method, ratio=ratio, overwrite=True)
        rows.append((ratio, applied, result))
    print()
    print(f"{'ratio':>6} {'experts/layer':>14} {'weight bytes':>14} {'size':>7} {'max |Δlogit|':>13} "
          f"{'verify':>7}  folder")
    for ratio, applied, result in rows:
        r = applied.report
        print(f"{ratio:>6.0%} {r['num_experts_before']:>6} -> {r['num_experts_after']:<5} "
              f"{r['weight_bytes_after']:>14,} {r['weight_bytes_after'] / r['weight_bytes_before']:>7.1%} "
              f"{result.max_abs_diff:>13.2e} {'PASS' if result.passed else 'FAIL':>7}  {applied.out}")
    print("\nEach pruned folder loads with AutoModelForCausalLM.from_pretrained and holds moeprune_report.json.")
    return 0 if all(r.passed for _, _, r in rows) else 1

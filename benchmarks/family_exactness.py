"""Exactness of exports on every family: tiny random checkpoints pruned 25% / 50% with aimer through the in-memory
and the streaming path, each verified (stock reload vs masked original). Prints a markdown table; leaves nothing.

    python benchmarks/family_exactness.py
"""

import logging
import shutil
import tempfile
from pathlib import Path

from moeprune import api
from moeprune.tiny import FAMILY_CONFIGS, save_tiny


def main() -> None:
    logging.getLogger("moeprune").setLevel(logging.WARNING)
    print("| family | ratio | experts/layer | in-memory max|Δ| (rel) | streaming max|Δ| (rel) | weight bytes kept |")
    print("|---|---|---|---|---|---|")
    for fam in sorted(FAMILY_CONFIGS):
        work = Path(tempfile.mkdtemp())
        try:
            original = save_tiny(fam, work / "o", seed=1)
            for ratio in (0.25, 0.5):
                plan = api.make_plan(original, "aimer", ratio)
                mem = api.apply_plan(original, plan, work / f"m{ratio}")
                stream = api.apply_plan(original, plan, work / f"s{ratio}", streaming=True)
                a, b = api.verify(original, mem.out), api.verify(original, stream.out)
                r = mem.report
                kept = r["weight_bytes_after"] / r["weight_bytes_before"]
                print(f"| {fam} | {ratio:.0%} | {r['num_experts_before']}→{r['num_experts_after']} "
                      f"| {a.max_abs_diff:.1e} ({a.relative:.1e}) | {b.max_abs_diff:.1e} ({b.relative:.1e}) "
                      f"| {kept:.1%} |")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

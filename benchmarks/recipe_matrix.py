"""Two-stage recipes x the tiny families: does every combination export and verify, in memory and layer by layer?

    python benchmarks/recipe_matrix.py [--families qwen3_moe,deepseek_v3] [--recipes reap+top_p,msmoe+compress]
                                       [--lazy] [--out benchmarks/results/recipe_matrix.md]

Each cell is one `moeprune.prune` with verification on a tiny random model of the family (8 experts, 3 layers), 4 x
32 calibration tokens: PASS (the stock reload equals the original with every stage's reference, within the verify
tolerance), FAIL (verification ran and differed: a bug), "refused: ..." (the recipe's checks declined it before any
work, with their reason: expected for combinations a layout cannot take), or ERROR (any exception once the work
started, moeprune's own errors included: a bug, or a refusal that came too late). `--lazy` runs every cell layer by
layer as well and reports both. Single stages are covered per family by `benchmarks/families.py`; this matrix is
where the stages meet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

RECIPES: dict[str, list[dict]] = {
    "reap+top_p": [{"method": "reap", "ratio": 0.25}, {"method": "top_p", "target_active": 1.5}],
    "msmoe+naee_skip": [{"method": "msmoe", "ratio": 0.25}, {"method": "naee_skip"}],
    "camera+topk": [{"method": "camera", "ratio": 0.5}, {"method": "topk", "k": 1}],
    "reap+wanda": [{"method": "reap", "ratio": 0.25}, {"method": "wanda", "sparsity": 0.5}],
    "stun+wanda2:4": [{"method": "stun", "ratio": 0.25}, {"method": "wanda", "pattern": "2:4"}],
    "msmoe+compress": [{"method": "msmoe", "ratio": 0.25}, {"method": "compress", "rank": 4}],
    "reap+quantize": [{"method": "reap", "ratio": 0.25}, {"method": "quantize", "scheme": "w4a16", "group_size": 16}],
    "heapr+repair": [{"method": "heapr", "ratio": 0.5}, {"method": "repair"}],
    "naee+camera": [{"method": "naee", "ratio": 0.25}, {"method": "camera", "ratio": 0.5}],
    "hcsmoe+wanda": [{"method": "hcsmoe", "ratio": 0.25}, {"method": "wanda", "sparsity": 0.5, "owl": True}],
}


def cell(family: str, recipe: list[dict], root: Path, text: Path, lazy: bool) -> tuple[str, float]:
    """(outcome, seconds) of one prune + verify."""
    from moeprune.api import CalibrateOptions, prune
    from moeprune.errors import MoePruneError
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.models import get_adapter
    from moeprune.pipeline.recipe import check_chain, parse_recipe
    from moeprune.tiny import save_tiny

    src = root / f"src-{family}"
    if not src.exists():
        save_tiny(family, src, seed=3, with_tokenizer=True)
    out = Path(tempfile.mkdtemp(dir=root)) / "out"
    calib = CalibrateOptions((f"web={text}",), samples=4, seq_len=32, held_out=0)
    t = time.perf_counter()
    try:  # the recipe's checks before any work: what they refuse is "refused"; any later exception is an ERROR
        check_chain(parse_recipe(recipe, "matrix"), get_adapter((c := Checkpoint.open(src)).config,
                                                                 weight_keys=c.names()))
    except MoePruneError as e:
        return f"refused: {str(e)[:160]}", time.perf_counter() - t
    try:
        _, result = prune(src, out, recipe, calib=calib, lazy=lazy)
        outcome = "PASS" if result.passed else f"FAIL ({result.line()})"
    except Exception as e:  # noqa: BLE001 (a bug: reported, the matrix goes on)
        last = traceback.extract_tb(e.__traceback__)[-1]
        outcome = f"ERROR {type(e).__name__}: {str(e)[:120]} ({Path(last.filename).name}:{last.lineno})"
    return outcome, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    from moeprune.tiny import FAMILY_CONFIGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILY_CONFIGS))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--lazy", action="store_true", help="also run every cell layer by layer")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    families, recipes = a.families.split(","), a.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES] + [f for f in families if f not in FAMILY_CONFIGS]
    if unknown:
        ap.error(f"unknown {unknown}; recipes: {', '.join(RECIPES)}; families: {', '.join(FAMILY_CONFIGS)}")
    modes = [False, True] if a.lazy else [False]
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="recipe-matrix-") as tmp:
        root = Path(tmp)
        text = root / "web.txt"
        g = torch.Generator().manual_seed(0)
        words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "kappa", "theta", "lambda", "zeta"]
        text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (1500,), generator=g)))
        for family in families:
            for name in recipes:
                for lazy in modes:
                    outcome, secs = cell(family, RECIPES[name], root, text, lazy)
                    bad += outcome.startswith(("FAIL", "ERROR"))
                    rows.append((family, name, "lazy" if lazy else "memory", outcome, secs))
                    print(f"{family:13s} {name:17s} {'lazy' if lazy else 'memory':6s} {secs:6.1f}s  {outcome}",
                          flush=True)
    table = ["| family | recipe | mode | outcome | s |", "|---|---|---|---|---|"]
    table += [f"| {f} | {r} | {m} | {o.replace('|', '/')} | {s:.1f} |" for f, r, m, o, s in rows]
    summary = f"{len(rows)} cells: {sum(o == 'PASS' for *_, o, _ in rows)} PASS, {bad} FAIL/ERROR, " \
              f"{sum(o.startswith('refused') for *_, o, _ in rows)} refused"
    print("\n" + "\n".join(table) + "\n\n" + summary)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(table) + "\n\n" + summary + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

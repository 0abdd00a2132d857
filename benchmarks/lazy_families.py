"""Every MoE family: the layer-by-layer prune writes the same tensors as the in-memory prune, bit for bit.

    python benchmarks/lazy_families.py [--methods heapr:0.5,msmoe:0.25] [--only qwen3_moe,cohere2_moe]

For each family of the installed transformers (`benchmarks/families.py:families_to_check`), a tiny random model of
its own config class is pruned twice by `moeprune.api.prune` with the same calibration text (4 windows of 32
tokens): in memory (`lazy=False`) and layer by layer (`lazy=True`: calibration, HEAPr's top-down backward and the
layered export one decoder layer at a time). Every tensor of the two exports is compared: `equal` counts the
bit-identical ones, `max rel` is the largest max |Δ| / max |in-memory| over the others. A family moeprune refuses,
or a method its layout does not allow, shows moeprune's reason; any other error is a failure (exit 1).
`tests/test_family_matrix.py` runs the in-memory / layer-by-layer statistics check on every family in CI; this
script checks the exported tensors of whole methods.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from families import _calib, _write_text, families_to_check  # noqa: E402  (run from benchmarks/)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_exports(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    """(bit-identical tensors, tensors, largest relative max |Δ| over the rest); names must match."""
    if a.keys() != b.keys():
        raise AssertionError(f"tensor names differ: {sorted(set(a) ^ set(b))[:4]}")
    equal, worst = 0, 0.0
    for name, x in a.items():
        y = b[name]
        if x.shape == y.shape and torch.equal(x, y):
            equal += 1
        elif x.shape != y.shape or not x.is_floating_point():
            worst = float("inf")
        else:
            worst = max(worst, float((x.double() - y.double()).abs().max() / x.double().abs().max().clamp_min(1e-12)))
    return equal, len(a), worst


def check(model_type: str, root: Path, text: Path, methods: list[tuple[str, float]]) -> list[str]:
    """One cell per method: 'equal/total' (+ max rel when not all equal), or moeprune's reason."""
    from moeprune import api
    from moeprune.errors import MoePruneError
    from moeprune.tiny import tiny_tokenizer
    from moeprune.tiny_families import NOT_BUILDABLE, tiny_family_model

    if model_type in NOT_BUILDABLE:
        return [f"not built: {NOT_BUILDABLE[model_type][:60]}"] * len(methods)
    try:
        path = root / model_type
        tiny_family_model(model_type, seed=7).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    except Exception as e:  # noqa: BLE001  (a family this transformers cannot build tiny: said, not hidden)
        return [f"not built: {type(e).__name__}"] * len(methods)
    cells = []
    for method, ratio in methods:
        try:
            outs = {}
            for lazy in (False, True):
                out = root / f"{model_type}-{method}-{lazy}"
                api.prune(path, out, method=method, ratio=ratio, calib=_calib(text, lazy=lazy))
                outs[lazy] = _tensors(out)
            equal, total, worst = compare_exports(outs[False], outs[True])
            cells.append(f"{equal}/{total}" + ("" if equal == total else f" (max rel {worst:.1e})"))
        except MoePruneError as e:
            cells.append("– " + str(e).split("\n")[0].split(": ", 1)[-1][:70])
        except Exception as e:  # noqa: BLE001  (reported in the table and the exit status, not a crash of the run)
            cells.append(f"ERROR {type(e).__name__}: {str(e)[:70]}")
    return cells


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="heapr:0.5,msmoe:0.25", help="METHOD:RATIO, comma-separated")
    p.add_argument("--only", default="", help="comma-separated model types (default: every MoE family)")
    args = p.parse_args()
    methods = [(m.split(":")[0], float(m.split(":")[1])) for m in args.methods.split(",") if m]
    types = [t for t in args.only.split(",") if t] or families_to_check()
    rows, t0 = {}, time.time()
    with tempfile.TemporaryDirectory(prefix="moeprune-lazy-families-") as tmp:
        root = Path(tmp)
        text = _write_text(root)
        for i, mt in enumerate(types):
            rows[mt] = check(mt, root, text, methods)
            print(f"[{i + 1}/{len(types)}] {mt}: {' | '.join(rows[mt])}", file=sys.stderr, flush=True)
    header = " | ".join(f"{m} {r:g}" for m, r in methods)
    print(f"\n| family | {header} |\n|---|{'---|' * len(methods)}")
    for mt, cells in rows.items():
        print(f"| {mt} | {' | '.join(cells)} |")
    same = {m: sum(1 for cells in rows.values() if "/" in cells[j] and "max rel" not in cells[j]
                   and not cells[j].startswith("–")) for j, (m, _) in enumerate(methods)}
    differ = [mt for mt, cells in rows.items() if any("max rel" in c or c.startswith("ERROR") for c in cells)]
    print(f"\n{len(types)} families, {time.time() - t0:.0f} s; bit-identical exports: "
          + ", ".join(f"{m} {n}" for m, n in same.items()) + f"; differing or failing: {differ or 'none'}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Structured then unstructured on the testbed (issue 22): at equal removed routed-expert parameters, Wanda alone
(with and without OWL); STUN's experts then Wanda (the paper's claim: better than unstructured alone), with
moeprune's measured defaults (router distance, most used member kept) and with the paper's released Arctic rules
(co-selection, member nearest the weight centroid); STUN's experts alone; HEAPr; the expert-level criterion; and
M-SMoE with and without MC-SMoE's compress at equal bytes.

Every variant is a real `moeprune prune` of the testbed (calibration, plan, export, verify), scored on the held-out
windows: per-domain perplexity ratio against the original and its geo-mean (`heldout.py`). Removed parameters
count routed-expert weight matrices (gate, up, down): zeroed weights (Wanda), removed experts, removed neurons.
STUN + Wanda splits a budget s as STUN removing r_e = round(s/2 · E)/E of the experts, then Wanda
s' = 1 − (1 − s)/(1 − r_e) inside the kept ones, so (1 − r_e)(1 − s') = 1 − s.

Compress at equal bytes: M-SMoE 50 % (8 of 16 experts: half the routed bytes) against M-SMoE 25 % followed by
compress of every kept expert (`experts: all`) with sparsity 0.9 and the rank whose factorised bytes are 2/3 of the
dense ones (`merge.compress.factorised_bytes`): 0.75 · 2/3 = 0.5 of the routed bytes, stored factorised.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/stun_wanda.py [--out benchmarks/results/stun_wanda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from heldout import HeldOut, results_path, save_results

from moeprune import api
from moeprune.io.checkpoint import Checkpoint
from moeprune.merge.compress import factorised_bytes
from moeprune.models import get_adapter


def removed_share(folder: Path, original: Path) -> float:
    """1 − non-zero routed-expert weights of the export / routed-expert weights of the original (from the files)."""
    from safetensors.torch import load_file

    def count(path: Path, nonzero: bool) -> int:
        total = 0
        for name, t in load_file(path / "model.safetensors").items():
            if ".mlp.experts." in name and name.endswith(("proj.weight", "gate_up_proj", "down_proj")):
                total += int((t != 0).sum()) if nonzero else t.numel()
        return total

    return 1 - count(folder, True) / count(original, False)


def compress_rank(H: int, I: int, share: float, sparsity: float, value_bytes: int) -> int:
    """The largest rank whose factorised bytes of an [I, H] matrix stay within `share` of its dense bytes."""
    dense = H * I * value_bytes
    rank = 1
    while factorised_bytes((I, H), rank + 1, sparsity, value_bytes) <= share * dense:
        rank += 1
    return rank


def variants(budgets: list[float], E: int, rank: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in budgets:
        r_e = round(s / 2 * E) / E
        inner = 1 - (1 - s) / (1 - r_e)
        out[f"wanda {s:.0%}"] = [{"method": "wanda", "sparsity": s}]
        out[f"wanda+OWL {s:.0%}"] = [{"method": "wanda", "sparsity": s, "owl": True}]
        out[f"stun {r_e:.1%} + wanda {inner:.1%} (= {s:.0%})"] = [{"method": "stun", "ratio": r_e},
                                                                  {"method": "wanda", "sparsity": round(inner, 4)}]
        out[f"stun (co-selection, centroid) {r_e:.1%} + wanda {inner:.1%}"] = [
            {"method": "stun", "ratio": r_e, "mix": 0.0, "keep": "centroid"},
            {"method": "wanda", "sparsity": round(inner, 4)}]
        out[f"stun experts {s:.0%}"] = [{"method": "stun", "ratio": s}]
        out[f"tcess_top1 experts {s:.0%}"] = [{"method": "tcess_top1", "ratio": s}]
        out[f"heapr expert-uniform {s:.0%}"] = [{"method": "heapr", "ratio": s}]
        out[f"heapr global {s:.0%}"] = [{"method": "heapr", "ratio": s, "budget": "global"}]
        if s == 0.5:
            out["wanda 2:4 (50%)"] = [{"method": "wanda", "pattern": "2:4"}]
    out["msmoe 50% (bytes 0.50)"] = [{"method": "msmoe", "ratio": 0.5}]
    out[f"msmoe 25% + compress rank {rank} (bytes 0.50)"] = [
        {"method": "msmoe", "ratio": 0.25}, {"method": "compress", "rank": rank, "sparsity": 0.9, "experts": "all"}]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.7])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="run only the variants whose label contains one of these")
    ap.add_argument("--out", default="benchmarks/results/stun_wanda")
    args = ap.parse_args(argv)
    out = results_path(args.out)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    hold = HeldOut.build(args.testbed, args.calib_samples, args.eval_sequences)
    ckpt = Checkpoint.open(hold.tb.path)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    E, H, I = adapter.num_experts, int(adapter.config.hidden_size), adapter.expert_width
    value_bytes = next(iter(ckpt.torch_dtypes().values())).itemsize
    rank = compress_rank(H, I, 2 / 3, 0.9, value_bytes)
    rows = {}
    for label, recipe in variants(args.budgets, E, rank).items():
        if args.only and not any(o in label for o in args.only):
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            applied, verified = api.prune(hold.tb.path, Path(tmp) / "v", recipe=recipe, calib=hold.calib)
            per, mean = hold.score(Path(tmp) / "v")
            removed = removed_share(Path(tmp) / "v", hold.tb.path)
        rows[label] = {"recipe": recipe, "domains": per, "mean": mean, "removed": removed,
                       "verify": bool(verified.passed) if verified is not None else None,
                       "seconds": time.perf_counter() - start}
        print(f"  {label:<48} removed {removed:.3f}  geo-mean ×{mean:.3f}  verify "
              f"{rows[label]['verify']}  {rows[label]['seconds']:.0f} s", flush=True)
    md = [f"Testbed `{hold.tb.path.name}` (E = {E}, H = {H}, I = {I}); {args.calib_samples} calibration windows per "
          f"domain, {args.eval_sequences} held-out windows per domain; compress rank {rank} (sparsity 0.9, bytes "
          f"≤ 2/3 of dense); {time.perf_counter() - t0:.0f} s in all.\n",
          "| variant | removed | " + " | ".join(hold.domains) + " | geo-mean | verify |",
          "|---|---:|" + "---:|" * len(hold.domains) + "---:|---|"]
    for label, r in rows.items():
        md.append(f"| {label} | {r['removed']:.3f} | " + " | ".join(f"×{r['domains'][d]:.3f}" for d in hold.domains)
                  + f" | **×{r['mean']:.3f}** | {'PASS' if r['verify'] else r['verify']} |")
    save_results(out, {"rows": rows, "rank": rank, "E": E}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

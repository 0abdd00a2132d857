"""The `verbs` section of `benchmarks/gpu_check.py`: each method family with `--device cuda`, in memory and layer by
layer (`--lazy`), as a user runs them (subprocesses, four at a time), on the tiny bf16 qwen3_moe that the prune section
saved (or one made here). Each `prune` verifies its own export (exit 1 beyond tolerance). For each method the two
exports are compared: the plans' decisions (kept experts, merge groups, kept neurons: integers) must be identical and
their scores close, and the two checkpoints' tensors are compared (max |Δ|). A layer-by-layer `verify --device cuda`
of one export and `analyze` both ways close the section.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from gpu_serve import _cell, cli, tiny_inputs

ROOT = Path(__file__).resolve().parent.parent
# method -> prune flags (the tiny model's experts are 16 wide, kept widths multiples of 8: neuron methods at 50 %)
METHODS = {
    "naee": ["--method", "naee", "--ratio", "0.25"],
    "msmoe": ["--method", "msmoe", "--ratio", "0.25"],
    "dern": ["--method", "dern", "--ratio", "0.25"],
    "heapr": ["--method", "heapr", "--ratio", "0.5"],
    "camera": ["--method", "camera", "--ratio", "0.5"],
    "wanda": ["--method", "wanda", "--sparsity", "0.5"],
    "recipe": ["--recipe", str(ROOT / "examples" / "msmoe_compress.yaml")],
    "hcsmoe": ["--method", "hcsmoe", "--ratio", "0.25"],
    "submoe": ["--method", "submoe", "--ratio", "0.25"],
    "msmoe weighted": ["--method", "msmoe", "--ratio", "0.25", "--router", "weighted"],
    "stun": ["--method", "stun", "--ratio", "0.25"],
    "top_p": ["--method", "top_p", "--target-active", "1.5"],
    "naee_skip": ["--method", "naee_skip", "--target-active", "1.5"],
}
MODES = {"in memory": "--no-lazy", "layer by layer": "--lazy"}


def _compare_json(a, b, path: str = "") -> tuple[list[str], float]:
    """(paths where a and b differ in anything but a float, largest relative difference of their floats)."""
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return [path], 0.0
        return [], abs(a - b) / max(abs(a), abs(b), 1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [path + "{keys}"], 0.0
        parts = [_compare_json(a[k], b[k], f"{path}.{k}") for k in a]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [path + "[len]"], 0.0
        parts = [_compare_json(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))]
    else:
        return ([] if a == b else [path]), 0.0
    return [p for d, _ in parts for p in d], max((r for _, r in parts), default=0.0)


def compare_exports(a: Path, b: Path) -> dict:
    """Plans (decisions exact, scores' largest relative Δ) and tensors (max |Δ|) of two exports of one method."""
    from safetensors.torch import load_file

    plans = sorted(p.name for p in (a / "moeprune_plans").glob("*.json"))
    if plans != sorted(p.name for p in (b / "moeprune_plans").glob("*.json")):
        return {"plans_equal": False, "detail": "different plan files"}
    differ, rel = [], 0.0
    for name in plans:
        d, r = _compare_json(*(json.loads((x / "moeprune_plans" / name).read_text()) for x in (a, b)), name)
        differ, rel = differ + d, max(rel, r)

    def tensors(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}

    ta, tb = tensors(a), tensors(b)
    if not ta and not tb:  # a routing export that changes the config only
        same = json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
        return {"plans_equal": not differ, "differ": differ[:5], "score_rel": rel, "tensors": "none",
                "tensor_max_abs": 0.0 if same else float("nan")}
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        return {"plans_equal": not differ, "differ": differ[:5], "score_rel": rel, "tensors": "different shapes"}
    dt = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    return {"plans_equal": not differ, "differ": differ[:5], "score_rel": rel, "tensor_max_abs": dt}


def out_dir(work: Path, method: str, flag: str) -> Path:
    return work / f"v-{method.replace(' ', '_')}-{flag[2:]}"


def verdict(log: str) -> str:
    """'PASS 1.2e-03' from a verify line ('max abs logit difference: 1.2e-03 (...) -> PASS'), or ''."""
    m = re.search(r"max abs logit difference: (\S+).*-> (PASS|FAIL)", log)
    return f"{m.group(2)} {m.group(1)}" if m else ""


def verbs(dev: str, work: Path) -> tuple[dict, str]:
    src, text = tiny_inputs(work, "qwen3_moe")
    calib = ["--calib", f"web={text}", "--samples", "16", "--seq-len", "64", "--device", dev]
    jobs = {(m, mode): ["prune", str(src), *flags, *calib, flag, "--out", str(out_dir(work, m, flag)),
                        "--overwrite"]
            for m, flags in METHODS.items() for mode, flag in MODES.items()}
    jobs.update({("analyze", mode): ["analyze", str(src), *calib, flag, "--out", str(work / f"v-analyze-{flag[2:]}"),
                                     "--overwrite"] for mode, flag in MODES.items()})
    os.environ.setdefault("OMP_NUM_THREADS", "4")  # four subprocesses at a time on the device's 16 cores
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(jobs, pool.map(lambda args: cli(*args, timeout=180), jobs.values()), strict=True))
    rows: dict = {}
    for (m, mode), (rc, s, out, err) in done.items():
        rows.setdefault(m, {})[mode] = {"rc": rc, "s": round(s, 1), "log": err[-400:] if rc else "",
                                        "verify": verdict(out + err)}
    for m in METHODS:
        if all(rows[m][mode]["rc"] == 0 for mode in MODES):
            rows[m]["same"] = compare_exports(*(out_dir(work, m, flag) for flag in MODES.values()))
    rv, sv, vout, verr = cli("verify", str(src), str(out_dir(work, "msmoe", "--lazy")), "--lazy", *calib, timeout=180)
    rows["verify --lazy"] = {"rc": rv, "s": round(sv, 1), "line": (vout.strip() or verr[-300:])[-300:]}
    lines = ["\n### Every method with `--device " + dev + "`, in memory and layer by layer (`--lazy`)\n",
             "tiny bf16 qwen3_moe (8 experts, top-2); each prune verifies its export. 'same' compares the two "
             "exports: plan decisions identical, scores' largest relative Δ, tensors' max |Δ|.\n",
             "| method | in memory: exit, s, verify | layer by layer: exit, s, verify | same decisions "
             "| scores rel Δ | tensors max \\|Δ\\| |", "|---|---|---|---|---|---|"]
    for m, v in rows.items():
        if m == "verify --lazy":
            continue
        same = v.get("same", {})
        cells = [f"{v[mode]['rc']}, {v[mode]['s']}, {v[mode]['verify'] or _cell(v[mode]['log'], 150)}"
                 for mode in MODES]
        lines.append(f"| {m} | {cells[0]} | {cells[1]} "
                     f"| {same.get('plans_equal', '—')} {' '.join(same.get('differ', []))[:80]} "
                     f"| {same.get('score_rel', float('nan')):.1e} | {same.get('tensor_max_abs', float('nan')):.1e} |")
    lines.append(f"\n`verify --lazy --device {dev}` of the layer-by-layer M-SMoE export: exit {rv} in {sv:.1f} s: "
                 f"{rows['verify --lazy']['line'][-200:]}")
    if torch.cuda.is_available():
        lines.append(f"\n({torch.cuda.device_count()} GPU(s); four subprocesses at a time, so the seconds overlap)")
    return rows, "\n".join(lines)

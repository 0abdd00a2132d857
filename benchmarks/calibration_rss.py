"""Peak host memory of moeprune calibration, the second table of `calibration_cost.py`.

Peak host memory: `collect` in a fresh subprocess on checkpoints saved with `save_tiny` with 2 and with 8
decoder layers (same layer size), loaded eagerly (`moeprune.io.load.load_model`) and, when
`moeprune.io.lazy` exists, lazily (`load_lazy`, `layer_context=lazy.layer`). Peak RSS is VmHWM from
/proc/self/status (ru_maxrss is not used: Linux carries the parent's peak over fork+exec). It is reset after
loading (`5 > /proc/self/clear_refs`), so "peak during collect" excludes transient loading copies; "above
load" = that peak - RSS right after loading (the calibration working set; for lazy loading it includes the
one materialised layer). MB = 1e6 bytes. Device peak memory (torch.cuda.max_memory_allocated) with
--device cuda only.

Run by `calibration_cost.py` (without `--no-rss`); this file is also each row's subprocess (`--child`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from calibration_cost import shape, tokens


def vm_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))


def rss_child(mode: str, path: str, seqs: int, seq_len: int, vocab: int, batch: int, threads: int) -> None:
    """Load `path` eagerly or lazily, run collect once, print a JSON line of memory numbers."""
    import torch

    torch.set_num_threads(threads)
    from moeprune.calibration.session import collect
    from moeprune.io.load import load_model
    from moeprune.models import get_adapter

    cs = tokens(seqs, seq_len, vocab)
    imports_kb = vm_kb("VmRSS")
    if mode == "lazy":
        from moeprune.io.lazy import load_lazy

        lazy = load_lazy(path)
        model, context = lazy.model, lazy.layer
    else:
        model, context = load_model(path), None
    load_hwm_kb, loaded_kb = vm_kb("VmHWM"), vm_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    t = time.perf_counter()
    res = collect(model, get_adapter(model.config), [cs], batch_size=batch, layer_context=context)
    wall = time.perf_counter() - t
    checksum = sum(float(s.sums["gate_norm_sum"].sum()) for s in res.stats["bench"].values())
    print(json.dumps({"imports_kb": imports_kb, "load_hwm_kb": load_hwm_kb, "loaded_kb": loaded_kb,
                      "peak_kb": vm_kb("VmHWM"), "reset": reset, "wall": wall, "checksum": checksum}))


def rss(args: argparse.Namespace, work: Path, lazy_ok: bool) -> list[dict]:
    from moeprune.tiny import save_tiny

    rows = []
    for layers in args.rss_layers:
        path = work / f"ckpt{layers}"
        save_tiny("qwen3_moe", path, seed=0, **shape(args, layers))
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for mode in ("eager", "lazy") if lazy_ok else ("eager",):
            cmd = [sys.executable, __file__, "--child", mode, str(path), str(args.seqs), str(args.seq_len),
                   str(args.vocab), str(args.batch), str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode:
                if mode == "eager":
                    sys.exit(f"{mode} child on {layers} layers failed:\n{proc.stderr}")
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]  # lazy loading is new: report, go on
                rows.append({"layers": layers, "mode": mode, "checkpoint_mb": disk / 1e6, "error": err})
                print(f"  rss {mode} {layers} layers FAILED: {err}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.splitlines()[-1])
            rows.append({"layers": layers, "mode": mode, "checkpoint_mb": disk / 1e6, **r})
            print(f"  rss {mode} {layers} layers: peak {r['peak_kb'] / 1e3:.0f} MB", file=sys.stderr)
        shutil.rmtree(path)
    return rows


def rss_table(args: argparse.Namespace, lazy_ok: bool) -> list[dict]:
    """Run the rows (`rss`) in a scratch folder and print their table; the rows."""
    work = Path(tempfile.mkdtemp(prefix="moeprune-calib-bench-"))
    try:
        rows = rss(args, work, lazy_ok)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nPeak host RSS of (b) collect, fresh process per row, same layer size, {args.seqs}x{args.seq_len} "
          f"tokens, batches of {args.batch}"
          + ("" if lazy_ok else "; moeprune.io.lazy not available: eager load only") + "\n")
    print("| load | decoder layers | checkpoint MB | RSS after imports MB | RSS after load MB | "
          "peak during collect MB | above load MB | collect wall s | stats checksum |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['layers']} | {r['checkpoint_mb']:.0f} | failed: {r['error'][:80]} "
                  "| | | | | |")
            continue
        print(f"| {r['mode']} | {r['layers']} | {r['checkpoint_mb']:.0f} | {r['imports_kb'] / 1e3:.0f} | "
              f"{r['loaded_kb'] / 1e3:.0f} | {r['peak_kb'] / 1e3:.0f}{'' if r['reset'] else ' (incl. load)'} | "
              f"{(r['peak_kb'] - r['loaded_kb']) / 1e3:.0f} | {r['wall']:.2f} | {r['checksum']:.6g} |")
    for mode in ("eager", "lazy"):
        got = {r["layers"]: r["peak_kb"] for r in rows if r["mode"] == mode and "error" not in r}
        lo, hi = min(args.rss_layers), max(args.rss_layers)
        if lo in got and hi in got and lo != hi:
            print(f"{mode}: peak RSS {hi} layers / {lo} layers = {got[hi] / got[lo]:.2f}")
    gpu = args.device.startswith("cuda")
    print("device peak memory of (b): " + ("see the timing table" if gpu else "n/a (no GPU)"))
    return rows


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    rss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]),
              int(sys.argv[8]))

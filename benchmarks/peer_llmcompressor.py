"""Benchmark: moeprune's REAP path side by side with llm-compressor's REAPPruningModifier (same model, same windows,
same batch size, same threads).

What is measured
    A qwen3_moe checkpoint (`--preset small`: the testbed shape with 32 experts top-4, 3.9 M parameters, as in
    `calibration_cost.py --preset small`; or `--model DIR`, a checkpoint with its tokenizer) and one calibration
    text (`--text FILE`; default: the testbed's held-out files when a testbed is cached, else generated text).
    moeprune builds the windows (`calibration.data.build_sets`, `--samples` x `--seq-len`, no held-out windows);
    the very same token ids are handed to llm-compressor as a DataLoader of `--batch` rows.
      moeprune, calibration pass   `session.collect` on the loaded model (every routed statistic), timed in a child
      moeprune, whole process      `moeprune calibrate ... --out stats` + `moeprune plan stats --method reap --ratio R`
                                   (two processes, wall time of each from fork to exit, summed)
      peer, calibration pass       time between REAPPruningModifier.on_calibration_start and on_calibration_end
                                   (its sequential pipeline over every decoder layer, REAP saliency hooks)
      peer, whole process          `oneshot(model, dataset=DataLoader, recipe=REAPPruningModifier(sparsity=R),
                                   pipeline="sequential", moe_calibrate_all_experts=False)` in a fresh process of
                                   the peer's Python: imports, load, calibration, pruning in memory (nothing saved)
    Every process runs with OMP_NUM_THREADS=1 (and torch.set_num_threads(1)); each measurement is repeated
    `--repeats` times and the median is reported (min in brackets). The peer runs in ITS OWN environment:
        python -m venv /tmp/llmc-venv && /tmp/llmc-venv/bin/pip install torch==2.13.0 llmcompressor
    Without `--peer-python` only the moeprune rows are measured.

Run:  python benchmarks/peer_llmcompressor.py --peer-python /tmp/llmc-venv/bin/python [--preset small]
          [--samples 256] [--seq-len 256] [--batch 8] [--ratio 0.25] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SRC = HERE.parent.parent / "src"
TESTBED = Path.home() / ".cache" / "moeprune"
SMALL = dict(hidden_size=128, moe_intermediate_size=64, intermediate_size=256, num_experts=32, num_experts_per_tok=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=2048, max_position_embeddings=1024,
             num_hidden_layers=4, mlp_only_layers=[])


# ----------------------------------------------------------------------------------------- peer child (its venv)
def peer_child(ckpt: str, windows: str, batch: int, ratio: float, out: str) -> None:
    """Runs under the peer's Python: llm-compressor's REAP on the given token windows. Imports no moeprune."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    t_import = time.perf_counter() - t0
    ids = torch.load(windows)  # [N, L]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    t_load = time.perf_counter() - t0 - t_import
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
    loader = DataLoader(rows, batch_size=batch, shuffle=False,
                        collate_fn=lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]})
    marks: dict[str, float] = {}
    start, end = REAPPruningModifier.on_calibration_start, REAPPruningModifier.on_calibration_end

    def on_start(self, *a, **k):
        marks["start"] = time.perf_counter()
        return start(self, *a, **k)

    def on_end(self, *a, **k):
        marks["end"] = time.perf_counter()
        return end(self, *a, **k)

    REAPPruningModifier.on_calibration_start, REAPPruningModifier.on_calibration_end = on_start, on_end
    t = time.perf_counter()
    pruned = oneshot(model=model, dataset=loader, recipe=REAPPruningModifier(sparsity=ratio), batch_size=batch,
                     num_calibration_samples=len(rows), max_seq_length=ids.shape[1], pipeline="sequential",
                     moe_calibrate_all_experts=False)
    t_oneshot = time.perf_counter() - t
    experts = getattr(pruned.config, "num_experts", None)
    Path(out).write_text(json.dumps({"import_s": t_import, "load_s": t_load, "oneshot_s": t_oneshot,
                                     "calib_s": marks["end"] - marks["start"], "experts_after": experts}))


# ----------------------------------------------------------------------------------------- moeprune children
def moeprune_pass(ckpt: str, text: str, samples: int, seq_len: int, batch: int, out: str) -> None:
    """The calibration pass alone: load, build windows, time `session.collect`."""
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
    from moeprune.calibration.session import collect
    from moeprune.io.load import load_model
    from moeprune.models import get_adapter

    sets = build_sets(CalibConfig((CalibSource("text", Path(text)),), samples=samples, seq_len=seq_len,
                                  held_out=0), AutoTokenizer.from_pretrained(ckpt))
    model = load_model(ckpt)
    t = time.perf_counter()
    collect(model, get_adapter(model.config), sets, batch_size=batch)
    Path(out).write_text(json.dumps({"calib_s": time.perf_counter() - t}))


def run_timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall


def prepare(args: argparse.Namespace, work: Path) -> tuple[str, str, str]:
    """(checkpoint folder, text file, windows file [N, L] for the peer)."""
    import torch

    from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
    from moeprune.tiny import save_tiny

    if args.model:
        ckpt = str(args.model)
    else:
        ckpt = str(work / "model")
        save_tiny("qwen3_moe", ckpt, seed=0, with_tokenizer=True, **SMALL)
    if args.text:
        text = str(args.text)
    else:
        testbeds = sorted(TESTBED.glob("testbed-*/data/*.heldout.txt"))
        body = "".join(p.read_text() for p in testbeds) if testbeds else " ".join(
            f"record {i}: value {i * 7 % 1000} is {'even' if i % 2 == 0 else 'odd'}." for i in range(200_000))
        text = str(work / "calib.txt")
        Path(text).write_text(body)
    from transformers import AutoTokenizer

    sets = build_sets(CalibConfig((CalibSource("text", Path(text)),), samples=args.samples, seq_len=args.seq_len,
                                  held_out=0), AutoTokenizer.from_pretrained(ckpt))
    if not bool(sets[0].attention_mask.all()):
        sys.exit("the text gives fewer full windows than --samples; pass a longer --text")
    windows = str(work / "windows.pt")
    torch.save(sets[0].input_ids.clone(), windows)
    return ckpt, text, windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-python", help="python of a venv with llmcompressor (e.g. /tmp/llmc-venv/bin/python)")
    ap.add_argument("--model", type=Path, help="checkpoint folder with tokenizer (default: the small preset model)")
    ap.add_argument("--text", type=Path, help="calibration text file")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(SRC))
    os.environ.setdefault("MOEPRUNE_TOKEN_CACHE", "off")  # calibrate pays its tokenisation (the peer gets ids)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(SRC)}
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="moeprune-peer-") as tmp:
        work = Path(tmp)
        ckpt, text, windows = prepare(args, work)
        for rep in range(args.repeats):
            out = work / "pass.json"
            run_timed([sys.executable, str(HERE), "--moeprune-pass", ckpt, text, str(args.samples),
                       str(args.seq_len), str(args.batch), str(out)], env)
            rows.setdefault("moeprune calibration pass (collect)", []).append(json.loads(out.read_text())["calib_s"])
            stats, plan = work / "stats.safetensors", work / "plan.json"
            for f in (stats, plan):
                f.unlink(missing_ok=True)
            cal = run_timed([sys.executable, "-m", "moeprune", "calibrate", ckpt, "--calib", f"text={text}",
                             "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size",
                             str(args.batch), "--held-out", "0", "--out", str(stats)], env)
            pl = run_timed([sys.executable, "-m", "moeprune", "plan", str(stats), "--method", "reap", "--ratio",
                            str(args.ratio), "--out", str(plan)], env)
            rows.setdefault("moeprune `calibrate` process", []).append(cal)
            rows.setdefault("moeprune `plan` process", []).append(pl)
            rows.setdefault("moeprune whole (calibrate + plan)", []).append(cal + pl)
            if args.peer_python:
                out = work / "peer.json"
                peer_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
                wall = run_timed([args.peer_python, str(HERE), "--peer-child", ckpt, windows, str(args.batch),
                                  str(args.ratio), str(out)], peer_env)
                got = json.loads(out.read_text())
                rows.setdefault("llm-compressor calibration pass (REAP hooks, sequential)", []).append(got["calib_s"])
                rows.setdefault("llm-compressor oneshot() call", []).append(got["oneshot_s"])
                rows.setdefault("llm-compressor whole process", []).append(wall)
                rows.setdefault("llm-compressor imports", []).append(got["import_s"])
            print(f"  repetition {rep + 1}/{args.repeats} done", file=sys.stderr)
    print(f"\nqwen3_moe checkpoint {'(small preset)' if not args.model else args.model}; {args.samples} windows x "
          f"{args.seq_len} tokens, batches of {args.batch}, REAP ratio {args.ratio}, 1 thread; median of "
          f"{args.repeats} [min]\n")
    print("| what | seconds |")
    print("|---|---:|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.2f} [{min(values):.2f}] |")
    med = {k: statistics.median(v) for k, v in rows.items()}
    if args.peer_python:
        print(f"\ncalibration pass moeprune / llm-compressor = "
              f"{med['moeprune calibration pass (collect)'] / med['llm-compressor calibration pass (REAP hooks, sequential)']:.2f}; "  # noqa: E501
              f"whole moeprune / llm-compressor = "
              f"{med['moeprune whole (calibrate + plan)'] / med['llm-compressor whole process']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-child":
        peer_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--moeprune-pass":
        sys.path.insert(0, str(SRC))
        moeprune_pass(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
    else:
        main()

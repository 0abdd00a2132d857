"""Benchmark: what read-ahead (`io/read_ahead.py`) saves from a cold page cache, in two kinds of work.

1. `big_model.py`'s plain layer-by-layer forward (its own process, one thread, the same calibration tokens): the
   next layer read while the current one computes.
2. A byte-range copy (`io/safetensors_io.write_file`, what streaming expert removal does) of the checkpoint's first
   --copy-gb GB of tensors into one file next to it: one 64 MB window read ahead of the copy.

Each mode runs with read-ahead off and on, alternated, each run after evicting the checkpoint's shards from the page
cache (POSIX_FADV_DONTNEED: the first read of every byte goes to the disk, as on a model larger than memory).
Prints each run's time, the medians and their ratio, and writes the tables to --out.

    python benchmarks/big_model.py --work /tmp/big --steps forward        # makes the 8.6 GB checkpoint once
    python benchmarks/read_ahead.py --model /tmp/big/qwen3moe-24x128-h1024-i448 --text /tmp/big/web.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_model import FORWARD  # noqa: E402  (the plain layer-by-layer forward the big-model table rates against)


def evict(model: Path) -> None:
    """Drop the checkpoint's clean pages from the page cache, so the next read of each layer goes to the disk."""
    for f in sorted(model.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def forward(model: Path, text: Path, samples: int, seq: int, read_ahead: bool) -> float:
    """Seconds of one plain layer-by-layer forward in its own process (start-up and tokenising included)."""
    evict(model)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", FORWARD, str(model), f"web={text}", str(samples), str(seq), "auto",
           "read-ahead" if read_ahead else "no-read-ahead"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def copy(model: Path, gb: float, read_ahead: bool) -> float:
    """Seconds `write_file` takes to copy the first `gb` GB of the checkpoint's tensors into one file (fsync
    included), with the read-ahead of `io/read_ahead.in_windows` on or off."""
    from moeprune.io import read_ahead as ra
    from moeprune.io.safetensors_io import OutTensor, read_header, write_file

    tensors, total = [], 0
    for f in sorted(model.glob("*.safetensors")):
        for e in read_header(f)[0]:
            if total < gb * 1e9:
                tensors.append(OutTensor(e.name, e.dtype, e.shape, e.file, ((e.begin, e.end),)))
                total += e.nbytes
    evict(model)
    out = model.parent / f"read_ahead_copy_{os.getpid()}.safetensors"
    advise_later = ra.advise_later
    if not read_ahead:
        ra.advise_later = lambda ranges: None  # in_windows asks through this name
    try:
        t = time.perf_counter()
        write_file(out, tensors)
        return time.perf_counter() - t
    finally:
        ra.advise_later = advise_later
        out.unlink(missing_ok=True)


def table(title: str, times: dict[bool, list[float]]) -> list[str]:
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return [title, "", "| read-ahead | runs, s | median s |", "|---|---|---|",
            f"| off | {' / '.join(f'{t:.1f}' for t in times[False])} | {off:.1f} |",
            f"| on | {' / '.join(f'{t:.1f}' for t in times[True])} | {on:.1f} |",
            "", f"on / off = {on / off:.3f}", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a checkpoint made by benchmarks/big_model.py")
    ap.add_argument("--text", type=Path, required=True, help="calibration text (big_model.py writes web.txt)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--copy-gb", type=float, default=3.0, help="GB the copy benchmark copies (default 3)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each mode, alternated (default 3)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/read_ahead.md"))
    a = ap.parse_args()
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("this platform has no posix_fadvise: read-ahead does nothing here")
    size = sum(f.stat().st_size for f in a.model.glob("*.safetensors"))
    lines = [f"{a.model.name}: {size / 1e9:.2f} GB, one thread, cold page cache before every run, {a.reps} runs per "
             "mode alternated", ""]
    for name, run in (("forward", lambda on: forward(a.model, a.text, a.samples, a.seq_len, on)),
                      ("copy", lambda on: copy(a.model, a.copy_gb, on))):
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(a.reps):
            for on in (False, True):
                times[on].append(run(on))
                print(f"{name}: run {rep + 1}/{a.reps}, read-ahead {'on' if on else 'off'}: {times[on][-1]:.1f} s",
                      flush=True)
        lines += table(f"layer-by-layer forward, {a.samples} x {a.seq_len} tokens" if name == "forward" else
                       f"byte-range copy of the first {a.copy_gb:g} GB of tensors (write_file, fsync included)", times)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

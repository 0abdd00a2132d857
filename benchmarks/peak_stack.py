"""Where a `moeprune` command's resident memory peaks: runs the command in this process with a thread that reads
/proc/self/statm every 10 ms and, at each new high (+20 MB), records the main thread's Python stack.

    OMP_NUM_THREADS=1 python benchmarks/peak_stack.py [--from GB] [--depth N] -- prune MODEL --method msmoe ... --lazy

Prints every high above --from (GB, default 1.2) with its innermost --depth frames, then the stack at the peak.
A sampled RSS can miss a peak shorter than the interval; `big_model.py` gives the exact one (wait4's ru_maxrss).
Found with it: each merged layer held the layer three times (the experts copied, the survivors copied again, the
kept experts sliced out), `RESULTS.md` "Session 21".
"""

from __future__ import annotations

import argparse
import atexit
import os
import runpy
import sys
import threading
import time
import traceback

PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="start", type=float, default=1.2, help="log highs above this many GB")
    ap.add_argument("--depth", type=int, default=4, help="frames per logged high")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the moeprune arguments")
    a = ap.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    main_thread = threading.main_thread()
    peak: list = [0, []]
    highs: list[str] = []

    def sample() -> None:
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
            if rss > peak[0] + 20e6:
                frame = sys._current_frames().get(main_thread.ident)
                stack = traceback.extract_stack(frame) if frame is not None else []
                peak[:] = [rss, stack]
                if rss > a.start * 1e9 and stack:
                    where = " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(stack[-a.depth:]))
                    highs.append(f"{rss / 1e9:.2f} GB: {where}")
            time.sleep(0.01)

    def report() -> None:
        print("\n".join(highs), file=sys.stderr)
        print(f"peak sampled RSS {peak[0] / 1e9:.2f} GB at:\n" + "".join(traceback.format_list(peak[1][-14:])),
              file=sys.stderr)

    threading.Thread(target=sample, daemon=True).start()
    atexit.register(report)
    sys.argv = ["moeprune", *command]
    runpy.run_module("moeprune", run_name="__main__")


if __name__ == "__main__":
    main()

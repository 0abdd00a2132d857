"""Where a GPU pass spends its time, for `benchmarks/gpu_check.py`'s calib section: one call under torch.profiler
(CPU and CUDA activity) and under CUDA's sync debug mode, which warns at every host synchronisation (`.item()`,
`int(tensor)`, a device-to-host copy). The calibration pass should sync a bounded number of times per layer, never
per batch per expert; the count and the call sites that synced are what the table says."""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch


def profile_call(fn: Callable[[], object], out: Path, name: str, rows: int = 30) -> dict:
    """Run fn() once profiled; write out/{name}_profile.txt (top ops by device time, then by CPU time, then the
    synchronising call sites) and return {"syncs": n, "sync_sites": [(site, count), ...]}."""
    cuda = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sites: Counter = Counter()

    def note(message, category, filename, lineno, file=None, line=None):  # one warning per host sync
        if "synchroniz" not in str(message):
            return
        here = [f for f in traceback.extract_stack()[:-1] if "moeprune" in f.filename]
        sites[f"{here[-1].filename.split('src/')[-1]}:{here[-1].lineno}" if here else "outside moeprune"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.profiler.profile(activities=acts) as prof:
                fn()
                if cuda:
                    torch.cuda.synchronize()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    events = prof.key_averages()
    text = [f"# {name}: one call profiled ({'CUDA + CPU' if cuda else 'CPU'})", ""]
    if cuda:
        text += ["## by device time", events.table(sort_by="cuda_time_total", row_limit=rows), ""]
    text += ["## by CPU time", events.table(sort_by="cpu_time_total", row_limit=rows), "",
             f"## host syncs: {sum(sites.values())}", *(f"{n:6d}  {s}" for s, n in sites.most_common(40))]
    (out / f"{name}_profile.txt").write_text("\n".join(text))
    return {"syncs": sum(sites.values()), "sync_sites": sites.most_common(10)}

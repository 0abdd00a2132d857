"""oneDNN's primitive cache is bounded in layer-by-layer processes only, and a capacity the user set is kept
(`io/kernel_cache.py`; the memory it saves is measured by `benchmarks/big_model.py`, not here).

Each case runs in a fresh interpreter: the variable is process-wide and oneDNN reads it once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeprune.io.kernel_cache import LAYERED_CAPACITY, VARIABLE

SRC = Path(__file__).resolve().parents[1] / "src"
PROBE = """
import os, sys, torch
torch.set_num_threads(1)
from moeprune.io.{module} import {loader}
m = {loader}(sys.argv[1])
print(os.environ.get("{var}", "unset"))
"""


def _capacity_after(loader: str, path: Path, preset: str | None) -> str:
    module = "lazy" if loader == "load_lazy" else "load"
    env = {k: v for k, v in os.environ.items() if k != VARIABLE} | {"PYTHONPATH": str(SRC)}
    if preset is not None:
        env[VARIABLE] = preset
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, loader=loader, var=VARIABLE), str(path)],
                         check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("loader", "preset", "expected"), [
    ("load_lazy", None, str(LAYERED_CAPACITY)),  # layer by layer: bounded
    ("load_lazy", "64", "64"),  # the user's value wins
    ("load_model", None, "unset"),  # loaded whole: oneDNN's default stays
])
def test_capacity_in_force(qwen, loader, preset, expected):
    assert _capacity_after(loader, qwen, preset) == expected

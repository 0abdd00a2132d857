"""`read_tensor` / `read_ranges` against safetensors' own reader (`safe_open`) on a file written by `save_file`."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeprune.errors import MoePruneError
from moeprune.io.safetensors_io import read_header, read_ranges, read_tensor


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g).bfloat16(), "b": torch.randn(3, 4, 2, generator=g),
               "c": torch.randint(0, 100, (9,), generator=g), "empty": torch.zeros(0, 4)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    return path


def test_whole_tensors_and_rows_equal_safe_open(stored):
    entries = {e.name: e for e in read_header(stored)[0]}
    with safe_open(str(stored), "pt") as f:
        for name, entry in entries.items():
            want = f.get_tensor(name)
            got = read_tensor(entry)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        rows = [0, 2, 3, 6]  # three runs of adjacent rows (0, 2-3, 6), read as separate ranges
        assert torch.equal(read_tensor(entries["a"], rows), f.get_tensor("a")[rows])
        assert torch.equal(read_tensor(entries["b"], [2, 0]), f.get_tensor("b")[[2, 0]])


def test_a_range_past_the_end_of_the_file_is_an_error(stored):
    size = stored.stat().st_size
    with pytest.raises(MoePruneError, match="truncated"):
        read_ranges(stored, [(size - 8, size + 8)], torch.uint8, (16,))

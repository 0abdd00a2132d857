"""Read-ahead (`io/read_ahead.py`): after reading layer i, the lazy model advises the kernel of exactly the bytes of
the layer it will read next, in pieces the kernel reads whole. References: the safetensors headers parsed here, and
byte-coverage arrays."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from moeprune.io import read_ahead
from moeprune.io.lazy import load_lazy
from moeprune.tiny import save_tiny


def _layer_bytes(folder, layer: int) -> dict:
    """file -> bool array of the bytes holding decoder layer `layer`'s tensors, from the raw headers."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        cover = np.zeros(len(raw), dtype=bool)
        for name, info in header.items():
            if re.match(rf"model\.layers\.{layer}\.", name):
                b, e = info["data_offsets"]
                cover[8 + n + b : 8 + n + e] = True
        out[f.resolve()] = cover
    return out


def _covered(ranges: dict, sizes: dict) -> dict:
    out = {}
    for f, size in sizes.items():
        cover = np.zeros(size, dtype=bool)
        for b, e in ranges.get(f, []):
            cover[b:e] = True
        out[f] = cover
    return out


@pytest.fixture
def advised(monkeypatch):
    """The ranges each read-ahead asked for, in order (the advice itself is not given)."""
    calls: list[dict] = []
    monkeypatch.setattr(read_ahead, "advise", lambda ranges: calls.append(
        {Path(os.path.realpath(f)): list(r) for f, r in ranges.items()}))
    return calls


def test_next_layer_follows_the_direction():
    assert read_ahead.next_layer(None, 0, 4) == 1
    assert [read_ahead.next_layer(i - 1, i, 4) for i in range(4)] == [1, 2, 3, 2]  # up; the other way at the top
    assert [read_ahead.next_layer(i + 1, i, 4) for i in range(3, -1, -1)] == [2, 1, 0, 1]  # down; up at the bottom
    assert read_ahead.next_layer(3, 3, 4) == 2  # the last layer again (HEAPr's backward pass): down
    assert read_ahead.next_layer(2, 2, 4) == 3  # the same layer again: up
    assert read_ahead.next_layer(0, 3, 4) == 2  # a jump to the top
    assert read_ahead.next_layer(None, 0, 1) is None


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="this platform has no posix_fadvise")
def test_lazy_layers_advise_the_next_layers_bytes(tmp_path, advised):
    path = save_tiny("qwen3_moe", tmp_path / "q", max_shard_size="40KB", num_hidden_layers=4)  # several shards
    sizes = {f.resolve(): f.stat().st_size for f in path.glob("*.safetensors")}

    def check(want: int, where: str) -> None:
        got, ref = _covered(advised[-1], sizes), _layer_bytes(path, want)
        for f in sizes:
            assert np.array_equal(got[f], ref[f]), f"{where}: advised bytes of {f.name} != layer {want}'s"

    lazy = load_lazy(path)
    lazy.ahead.result()
    assert len(advised) == 1
    check(0, "after loading")  # layer 0 is asked for while the rest of the model loads
    order = [0, 1, 2, 3, 3, 2, 1, 0]  # up (calibration), then down (HEAPr's backward pass)
    expected = [1, 2, 3, 2, 2, 1, 0, 1]
    for i, want in zip(order, expected, strict=True):
        before = len(advised)
        with lazy.layer(i):
            lazy.ahead.result()
        assert len(advised) == before + 1
        check(want, f"after layer {i}")
    lazy.read_ahead = False
    with lazy.layer(0):
        pass
    assert len(advised) == len(expected) + 1
    quiet = load_lazy(path, read_ahead=False)
    with quiet.layer(0):
        pass
    assert len(advised) == len(expected) + 1 and quiet.ahead is None


def test_byte_ranges_merge_against_coverage():
    class Entry:
        def __init__(self, b, e):
            self.file, self.begin, self.end = "/x", b, e

    class View:
        def __init__(self, ranges):
            self.source, self.ranges = "/y", ranges

    rng = np.random.default_rng(0)
    for _ in range(50):
        spans = [(int(b), int(b) + int(n)) for b, n in zip(rng.integers(0, 900, 12),
                                                                 rng.integers(0, 60, 12), strict=True)]
        got = read_ahead.byte_ranges([Entry(b, e) for b, e in spans[:6]] + [View(spans[6:]), object()])
        for f, part in (("/x", spans[:6]), ("/y", spans[6:])):
            want = np.zeros(1000, dtype=bool)
            for b, e in part:
                want[b:e] = True
            ranges = got.get(Path(f), [])
            have = np.zeros(1000, dtype=bool)
            for b, e in ranges:
                assert not have[b:e].any(), "ranges overlap"
                have[b:e] = True
            assert np.array_equal(have, want)
            gaps = [b2 - e1 for (_, e1), (b2, _) in zip(ranges, ranges[1:], strict=False)]
            assert all(g > 0 for g in gaps), "adjacent ranges not merged"


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="this platform has no posix_fadvise")
def test_advise_asks_in_pieces_the_kernel_reads_whole(tmp_path, monkeypatch):
    f = tmp_path / "data"
    f.write_bytes(bytes(1_000_000))
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: calls.append((off, n, how)))
    spans = [(10, 300_000), (400_000, 400_001), (500_000, 1_000_000)]
    read_ahead.advise({f: spans})
    assert calls and all(0 < n <= read_ahead.CHUNK and how == os.POSIX_FADV_WILLNEED for _, n, how in calls)
    have = np.zeros(1_000_000, dtype=int)
    for off, n, _ in calls:
        have[off : off + n] += 1
    want = np.zeros(1_000_000, dtype=int)
    for b, e in spans:
        want[b:e] = 1
    assert np.array_equal(have, want)

    def refuse(*_):
        raise OSError(22, "Invalid argument")

    from moeprune.io import fit

    calls.clear()
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: calls.append((off, n, how)))
    monkeypatch.setattr(fit, "available", lambda: 2 * 799_990)  # the spans hold 799 991 bytes
    read_ahead.advise({f: spans})
    assert not calls, "advised more than half of the memory left"
    monkeypatch.setattr(fit, "available", lambda: 2 * 799_991)
    read_ahead.advise({f: spans})
    assert calls
    monkeypatch.setattr(os, "posix_fadvise", refuse)
    read_ahead.advise({f: spans, tmp_path / "missing": [(0, 10)]})  # advice only: a refusal is not an error


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "posix_fadvise"), reason="needs fork and fadvise")
def test_read_ahead_runs_in_a_forked_child(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(bytes(4096))
    read_ahead.advise_later({f: [(0, 4096)]}).result(timeout=10)  # the parent's pool has its thread
    pid = os.fork()
    if pid == 0:  # child: the parent's pool thread is gone; a new one must do the work
        ok = False
        try:
            read_ahead.advise_later({f: [(0, 4096)]}).result(timeout=10)
            ok = True
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_copies_advise_one_window_ahead(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from moeprune.io.safetensors_io import OutTensor, read_header, write_file

    calls = []
    monkeypatch.setattr(read_ahead, "advise_later", lambda ranges: calls.append(ranges))
    path = save_tiny("qwen3_moe", tmp_path / "q", max_shard_size="40KB", num_hidden_layers=4)
    src = sorted(path.glob("*.safetensors"))
    tensors = [OutTensor(e.name, e.dtype, e.shape, e.file, ((e.begin, e.end),))
               for f in src for e in read_header(f)[0]]
    window = 30_000
    seen, advised_upto = [], []
    for t in read_ahead.in_windows(tensors, window):
        seen.append(t)
        advised_upto.append(len(calls))
    assert seen == tensors
    # every tensor's bytes were advised before it was yielded, exactly once over the whole copy
    sizes = {f.resolve(): f.stat().st_size for f in src}
    count = {f: np.zeros(n, dtype=int) for f, n in sizes.items()}
    for ranges in calls:
        for f, spans in ranges.items():
            for b, e in spans:
                count[Path(f).resolve()][b:e] += 1
    want = {f: np.zeros(n, dtype=int) for f, n in sizes.items()}
    for t in tensors:
        for b, e in t.ranges:
            want[Path(t.source).resolve()][b:e] += 1
    for f in sizes:
        assert np.array_equal(count[f], want[f])
    for k, t in enumerate(tensors):
        covered = np.zeros(sizes[Path(t.source).resolve()], dtype=bool)
        for ranges in calls[: advised_upto[k]]:
            for b, e in ranges.get(Path(t.source), []):
                covered[b:e] = True
        assert all(covered[b:e].all() for b, e in t.ranges), f"{t.name} was copied before it was advised"
    # ... and no more than two windows ahead: when a tensor is yielded, the bytes advised but not yet yielded
    # are below 2 windows plus one tensor
    done = 0
    for k, t in enumerate(tensors):
        ahead = sum(sum(e - b for spans in r.values() for b, e in spans) for r in calls[: advised_upto[k]]) - done
        assert ahead <= 2 * window + max(x.nbytes for x in tensors)
        done += t.nbytes
    out = tmp_path / "copy.safetensors"  # and write_file copies through it, byte for byte
    monkeypatch.undo()
    write_file(out, tensors)
    got, want = load_file(out), {k: v for f in src for k, v in load_file(f).items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)

"""`io/safetensors_io.copy_range`: byte ranges appended to an open file, in the kernel (`os.copy_file_range`) or
through a buffer, against the source's bytes read directly; a kernel copy refused part-way falls back and rewrites
what it had written."""

from __future__ import annotations

import errno
import os

import pytest

from moeprune.io import safetensors_io
from moeprune.io.safetensors_io import copy_range

RANGES = [(0, 1), (7, 4096 + 13), (5000, 5000), (9000, 70_000), (69_999, 70_000)]


def _copy(tmp_path, buf_size: int = 1000) -> bytes:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(70_000))
    out = tmp_path / "out.bin"
    with open(src, "rb") as s, open(out, "wb") as d:
        d.write(b"head")
        for b, e in RANGES:
            copy_range(s, d, b, e, bytearray(buf_size))
        d.write(b"tail")
    data = src.read_bytes()
    assert out.read_bytes() == b"head" + b"".join(data[b:e] for b, e in RANGES) + b"tail"
    return out.read_bytes()


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="the platform has no copy_file_range")
def test_kernel_copy_appends_the_ranges(tmp_path, monkeypatch):
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(safetensors_io, "_KERNEL_COPY", True)
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    _copy(tmp_path)
    assert len(calls) >= 4 and safetensors_io._KERNEL_COPY  # every non-empty range in the kernel


def test_buffered_copy_appends_the_ranges(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "_KERNEL_COPY", False)
    monkeypatch.setattr(os, "copy_file_range", lambda *a: pytest.fail("the kernel copy is off"), raising=False)
    _copy(tmp_path, buf_size=7)


def test_a_refused_kernel_copy_falls_back_and_stays_off(tmp_path, monkeypatch):
    """The kernel copies the first range, 100 bytes of the second, then refuses (as a file system without it
    would): the same bytes, the second range rewritten through the buffer, and no later call tries the kernel."""
    calls = []

    def partial(src, dst, count, offset_src, offset_dst):
        calls.append(count)
        if len(calls) < 3:
            return os.pwrite(dst, os.pread(src, min(count, 100), offset_src), offset_dst)
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(safetensors_io, "_KERNEL_COPY", True)
    monkeypatch.setattr(os, "copy_file_range", partial, raising=False)
    _copy(tmp_path)
    assert calls[:2] == [1, 4102] and len(calls) == 3 and not safetensors_io._KERNEL_COPY

"""`io.memory.reuse_freed_memory`: inside, large temporaries may come from the heap; after, the fixed mmap
threshold that layer-by-layer runs rely on is back and the heap is trimmed (glibc calls recorded on a fake)."""

from __future__ import annotations

import pytest

from moeprune.io import memory


class FakeLibc:
    def __init__(self):
        self.calls: list[tuple] = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_reuse_restores_the_fixed_threshold_and_trims(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "_FIXED", [])
    with memory.reuse_freed_memory():  # threshold never fixed here: glibc's own dynamic threshold stays
        pass
    assert libc.calls == []
    monkeypatch.setattr(memory, "_FIXED", [True])
    with pytest.raises(RuntimeError), memory.reuse_freed_memory():
        assert libc.calls == [("mallopt", memory.M_MMAP_THRESHOLD, memory.REUSE_THRESHOLD)]
        raise RuntimeError  # restored on the way out of an error too
    assert libc.calls[1:] == [("mallopt", memory.M_MMAP_THRESHOLD, memory.THRESHOLD), ("malloc_trim", 0)]


def test_nested_contexts_restore_the_enclosing_threshold_and_trim_once(monkeypatch):
    """The engine's batch loop (32 MiB) may run inside a wider context (NAEE's, 1 GiB) or around a narrower one:
    leaving the inner one must not drop the outer one's threshold back to the fixed 128 KiB."""
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "_FIXED", [True])
    monkeypatch.setattr(memory, "_REUSING", [])
    T, small, big = memory.M_MMAP_THRESHOLD, 32 << 20, 1 << 30
    with memory.reuse_freed_memory(small):
        with memory.reuse_freed_memory(big):
            assert libc.calls == [("mallopt", T, small), ("mallopt", T, big)]
        assert libc.calls[2:] == [("mallopt", T, small)]  # back to the outer threshold, no trim yet
        with memory.reuse_freed_memory(small):  # not wider than the open one: nothing changes
            pass
        assert len(libc.calls) == 3
    assert libc.calls[3:] == [("mallopt", T, memory.THRESHOLD), ("malloc_trim", 0)]
    assert memory._REUSING == []


def test_keep_top_raises_the_trim_threshold_once_and_restores_it(monkeypatch):
    """keep_top: the trim threshold is raised by the outermost keeping context only and restored (to the fixed
    128 KiB) when that one is left, before the trim."""
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "_FIXED", [True])
    monkeypatch.setattr(memory, "_REUSING", [])
    monkeypatch.setattr(memory, "_KEEPING", [])
    T, TRIM, small, big = memory.M_MMAP_THRESHOLD, memory.M_TRIM_THRESHOLD, 4 << 20, 32 << 20
    with memory.reuse_freed_memory(small, keep_top=True):
        with memory.reuse_freed_memory(big, keep_top=True):
            assert libc.calls == [("mallopt", T, small), ("mallopt", TRIM, memory.TRIM_WHILE_REUSING),
                                  ("mallopt", T, big)]
        assert libc.calls[3:] == [("mallopt", T, small)]  # the outer one still keeps the top
    assert libc.calls[4:] == [("mallopt", T, memory.THRESHOLD), ("mallopt", TRIM, memory.THRESHOLD),
                              ("malloc_trim", 0)]
    assert memory._REUSING == [] and memory._KEEPING == []


REAL_GLIBC = """
import json, resource, sys, torch
from moeprune.io import memory
torch.set_num_threads(1)
if not memory.release_freed_memory():
    print(json.dumps(None)); sys.exit()
def faults(**kw):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with memory.reuse_freed_memory(64 << 20, **kw):
        for i in range(40):
            t = torch.ones(2 << 20, dtype=torch.float32)  # an 8 MiB temporary, freed at the top of the heap
            del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(keep_top=True)  # torch's first-use allocations outside the counts
print(json.dumps([faults(), faults(keep_top=True), faults(), faults(keep_top=True)]))
"""


def test_keep_top_reuses_temporaries_freed_at_the_top_on_real_glibc():
    """On this machine's allocator (not a fake): 40 temporaries of 8 MiB (2 048 pages each), each freed at the top
    of the heap, inside `reuse_freed_memory(keep_top=True)`, fault in about one temporary's pages, not 40. Without
    keep_top the count depends on the heap's layout: a freed block that reaches the top goes back to the OS at the
    fixed 128 KiB trim threshold (80 k faults in a bare process), one below a live allocation is reused (4 k inside
    pytest), so only the keep_top count is asserted."""
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", REAL_GLIBC], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result is None:
        pytest.skip("no glibc mallopt here: nothing is fixed, nothing to reuse")
    pages = 40 * (8 << 20) // 4096
    kept = max(result[1], result[3])
    assert kept <= 0.25 * pages, f"faults without / with keep_top, twice: {result}"

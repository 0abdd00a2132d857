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
    T, TRIM = memory.M_MMAP_THRESHOLD, memory.M_TRIM_THRESHOLD
    with pytest.raises(RuntimeError), memory.reuse_freed_memory():
        assert libc.calls == [("mallopt", T, memory.REUSE_THRESHOLD), ("mallopt", TRIM, memory.TRIM_WHILE_REUSING)]
        raise RuntimeError  # restored on the way out of an error too
    assert libc.calls[2:] == [("mallopt", T, memory.THRESHOLD), ("mallopt", TRIM, memory.THRESHOLD),
                              ("malloc_trim", 0)]


def test_nested_contexts_restore_the_enclosing_threshold_and_trim_once(monkeypatch):
    """The engine's batch loop (32 MiB) may run inside a wider context (NAEE's, 1 GiB) or around a narrower one:
    leaving the inner one must not drop the outer one's threshold back to the fixed 128 KiB."""
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "_FIXED", [True])
    monkeypatch.setattr(memory, "_REUSING", [])
    T, TRIM, small, big = memory.M_MMAP_THRESHOLD, memory.M_TRIM_THRESHOLD, 32 << 20, 1 << 30
    with memory.reuse_freed_memory(small):
        with memory.reuse_freed_memory(big):
            assert libc.calls == [("mallopt", T, small), ("mallopt", TRIM, memory.TRIM_WHILE_REUSING),
                                  ("mallopt", T, big)]  # the trim threshold is raised once, by the outermost
        assert libc.calls[3:] == [("mallopt", T, small)]  # back to the outer threshold, no trim yet
        with memory.reuse_freed_memory(small):  # not wider than the open one: nothing changes
            pass
        assert len(libc.calls) == 4
    assert libc.calls[4:] == [("mallopt", T, memory.THRESHOLD), ("mallopt", TRIM, memory.THRESHOLD),
                              ("malloc_trim", 0)]
    assert memory._REUSING == []


REAL_GLIBC = """
import json, resource, sys, torch
from moeprune.io import memory
torch.set_num_threads(1)
if not memory.release_freed_memory():
    print(json.dumps(None)); sys.exit()
def faults(reuse):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctx = memory.reuse_freed_memory(64 << 20) if reuse else memory.reuse_freed_memory(memory.THRESHOLD)
    with ctx:
        for i in range(40):
            t = torch.ones(2 << 20, dtype=torch.float32)  # an 8 MiB temporary, freed at the top of the heap
            del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([faults(False), faults(True)]))
"""


def test_reused_temporaries_fault_their_pages_in_once_on_real_glibc():
    """On this machine's allocator (not a fake): 40 temporaries of 8 MiB (2 048 pages each) fault every page in
    again when mmapped (the fixed 128 KiB threshold), and only about once inside `reuse_freed_memory`. Each one
    is freed at the top of the heap, which glibc returns to the OS at once unless the trim threshold is raised
    with the mmap threshold (without that, 80 k faults here too)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", REAL_GLIBC], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result is None:
        pytest.skip("no glibc mallopt here: nothing is fixed, nothing to reuse")
    mmapped, reused = result
    pages = 40 * (8 << 20) // 4096
    assert mmapped >= 0.9 * pages  # every temporary's pages faulted in afresh
    assert reused <= 0.1 * pages   # the heap's pages reused: about one temporary's worth

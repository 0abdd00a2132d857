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

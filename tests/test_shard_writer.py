"""`ShardWriter` (the layer-by-layer export's shards) against safetensors' own reader: every tensor written,
in memory or copied from a source file, reads back equal through `safe_open` / `load_file`, with the header in
its kept room (padded) and when it outgrows the room (rewritten)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeprune.io.layered_export import ShardWriter
from moeprune.io.safetensors_io import read_header


def _tensors(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float16]
    return {f"layers.{k}.w": torch.randn(3, k % 4 + 1, generator=g).to(dtypes[k % 4]) for k in range(n)}


@pytest.mark.parametrize("behind", [0, 100])  # 100: writes on the writer thread, at most 100 bytes behind
@pytest.mark.parametrize("room", [0, 64])  # 0: the default room; 64 bytes: every header outgrows it
def test_shards_read_back_through_safetensors(tmp_path, room, behind):
    src = tmp_path / "src.safetensors"
    copied = {"embed": torch.randn(5, 4), "norm": torch.ones(4).bfloat16(), "empty": torch.zeros(0, 2)}
    save_file(copied, str(src))
    out = tmp_path / "out"
    out.mkdir()
    w = ShardWriter(out, max_bytes=200, behind=behind, **({"room": room} if room else {}))
    for entry in read_header(src)[0]:
        w.add_copy("copied." + entry.name, entry)
    tensors = _tensors(40)
    for name, t in tensors.items():
        w.add_tensor(name, t.t() if t.dim() == 2 and t.shape[1] > 1 else t)  # a non-contiguous one too
    files = w.close()
    assert len(files) > 1 and not list(out.glob(".*")), "temporary files left behind"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want = {**{"copied." + k: v for k, v in copied.items()},
            **{k: (t.t() if t.dim() == 2 and t.shape[1] > 1 else t) for k, t in tensors.items()}}
    assert set(index["weight_map"]) == set(want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    got = {}
    for name in files:
        got.update(load_file(str(out / name)))
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
        n = struct.unpack("<Q", (out / name).read_bytes()[:8])[0]
        assert n % 8 == 0  # data aligned to 8 bytes, as safetensors writes it
    assert set(got) == set(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t.contiguous()), k
    if room:  # every shard's header outgrew 64 bytes: the room grew for the next ones
        assert w.room > 64


def test_write_behind_runs_in_order_bounds_the_lag_and_reports_failures():
    """Jobs run on another thread in submission order; a submit waits while more than max_bytes are unwritten; a
    failed job's exception reaches the caller at the next submit or drain and the jobs after it are skipped; cancel
    skips what has not started."""
    import threading

    from moeprune.io.write_behind import WriteBehind

    ran, gate = [], threading.Event()
    behind = WriteBehind(max_bytes=10)
    behind.submit(lambda: (gate.wait(5), ran.append((1, threading.current_thread().name))), 8)
    behind.submit(lambda: ran.append((2, None)), 8)  # 8 <= 10 in flight: does not wait
    third = threading.Thread(target=behind.submit, args=(lambda: ran.append((3, None)), 1))
    third.start()
    third.join(0.3)
    assert third.is_alive() and ran == []  # 16 > 10 bytes unwritten: the third submit waits
    gate.set()
    third.join(5)
    behind.drain()
    assert [r[0] for r in ran] == [1, 2, 3] and ran[0][1] == "moeprune-write-behind"

    def fail():
        raise OSError("disk full")

    behind.submit(fail, 1)
    with pytest.raises(OSError, match="disk full"):
        behind.drain()
    with pytest.raises(OSError, match="disk full"):  # refused: nothing runs after a failed write
        behind.submit(lambda: ran.append((4, None)), 1)
    with pytest.raises(OSError, match="disk full"):
        behind.close()
    assert len(ran) == 3 and not behind._thread.is_alive()
    cancelled, hold = WriteBehind(max_bytes=100), threading.Event()
    cancelled.submit(lambda: hold.wait(5), 1)
    cancelled.submit(lambda: ran.append((5, None)), 1)
    threading.Timer(0.2, hold.set).start()
    cancelled.cancel()
    assert len(ran) == 3 and not cancelled._thread.is_alive()


def test_an_aborted_writer_leaves_no_file_and_no_thread(tmp_path):
    w = ShardWriter(tmp_path, max_bytes=200, behind=64)
    for name, t in _tensors(20).items():
        w.add_tensor(name, t)
    thread = w._thread._thread
    w.abort()
    assert not thread.is_alive() and not any(tmp_path.iterdir())

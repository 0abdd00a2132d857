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


@pytest.mark.parametrize("room", [0, 64])  # 0: the default room; 64 bytes: every header outgrows it
def test_shards_read_back_through_safetensors(tmp_path, room):
    src = tmp_path / "src.safetensors"
    copied = {"embed": torch.randn(5, 4), "norm": torch.ones(4).bfloat16(), "empty": torch.zeros(0, 2)}
    save_file(copied, str(src))
    out = tmp_path / "out"
    out.mkdir()
    w = ShardWriter(out, max_bytes=200, **({"room": room} if room else {}))
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

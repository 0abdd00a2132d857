"""Task packs (PreMoe TAER), each part against an independent reference:

- a task-pack load equals the task's pruned checkpoint exported by the ordinary pipeline and reloaded with stock
  `AutoModelForCausalLM.from_pretrained` (bit-equal logits), for a per-expert on-disk layout (qwen3_moe) and a
  fused one (gpt_oss);
- the load reads exactly the kept experts' byte ranges (plus every non-expert tensor and the router rows): every
  read of the shard is recorded by a wrapper around `open`, and compared with ranges computed here from the raw
  safetensors header;
- the stored task keys and a prompt's key equal mean router softmax distributions computed from the stock model's
  own `output_router_logits`; retrieval picks the nearest key by cosine (hand-computed), and below the margin
  threshold falls back to the full model (equal to the original's logits).
"""

from __future__ import annotations

import builtins
import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune import load_for_task
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.log import logger
from moeprune.taskpack.build import BuildOptions, build_pack
from moeprune.taskpack.export import export_task
from moeprune.taskpack.retrieve import nearest
from moeprune.tiny import save_tiny
from textgen import write_words

RATIOS = (0.5, 0.75)


def _calib(root: Path) -> CalibrateOptions:
    a = write_words(root / "a.txt", vocab=3, seed=1)  # a narrow vocabulary ...
    b = write_words(root / "b.txt", n=2500, vocab=12, seed=2)  # ... and a wide one
    return CalibrateOptions((f"a={a}", f"b={b}"), samples=6, seq_len=32, held_out=0)


_BUILT: dict[str, tuple] = {}


def _built(family: str, tmp_path_factory) -> tuple:
    """(root, model, calib, pack) of a tiny `family` model, built once per module run."""
    if family not in _BUILT:
        root = tmp_path_factory.mktemp(f"taskpack_{family}")
        model = save_tiny(family, root / "model", seed=3, with_tokenizer=True)
        calib = _calib(root)
        _BUILT[family] = root, model, calib, build_pack(model, calib, BuildOptions(RATIOS), root / "pack")
    return _BUILT[family]


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])  # per-expert and fused experts on disk
def built(request, tmp_path_factory):
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The softmax-before-top-k family alone: its brute-force key is the mean router softmax."""
    return _built("qwen3_moe", tmp_path_factory)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.mark.parametrize("task,ratio", [("a", 0.5), ("b", 0.75)])
def test_task_load_equals_stock_reload_of_the_export(built, task, ratio):
    root, model, _, pack = built
    loaded = load_for_task(root / "pack", task=task, ratio=ratio)
    out = root / f"export-{task}-{ratio}"
    _, verified = export_task(root / "pack", task, ratio, out)
    assert verified is not None and verified.passed
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    got, want = _logits(loaded.model, ids), _logits(stock, ids)
    assert torch.equal(got, want)
    assert got.abs().sum() > 0
    assert loaded.task == task and loaded.margin is None
    E = pack.num_experts
    assert stock.config.get_text_config().num_local_experts == round(E * (1 - ratio))
    assert loaded.kept == pack.tasks[task].plan(ratio).kept_experts
    full = AutoModelForCausalLM.from_pretrained(model).eval()
    assert not torch.equal(_logits(full, ids), got)  # something was removed


class ReadLog:
    """Every (offset, bytes) read from one file, through whatever Python file object opened it."""

    def __init__(self, path: Path):
        self.path, self.reads = str(Path(path).resolve()), []

    def wrap(self, real_open):
        log = self

        class Tracked:
            def __init__(self, f):
                self._f = f

            def read(self, n=-1):
                pos = self._f.tell()
                data = self._f.read(n)
                log.reads.append((pos, len(data)))
                return data

            def readinto(self, buf):
                pos = self._f.tell()
                n = self._f.readinto(buf)
                log.reads.append((pos, n))
                return n

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def opener(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            same = isinstance(file, (str, Path)) and str(Path(file).resolve()) == log.path and "b" in mode
            return Tracked(f) if same else f

        return opener


def _expected_ranges(shard: Path, kept: dict[int, list[int]], E: int) -> tuple[int, set[tuple[int, int]]]:
    """(data start, the byte ranges a load of `kept` must read), from the raw header: every tensor whole, except a
    per-expert tensor of a dropped expert (none of it) and the experts' rows of a router or fused tensor."""
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    want = set()
    for name, info in header.items():
        b, e = (base + x for x in info["data_offsets"])
        parts = name.split(".")
        layer = int(parts[2]) if parts[1] == "layers" else None
        if layer in kept and ".experts." in name and parts[parts.index("experts") + 1].isdigit():
            if int(parts[parts.index("experts") + 1]) in kept[layer]:
                want.add((b, e))
        elif layer in kept and (".experts." in name or ".gate.weight" in name or ".router." in name):
            row = (e - b) // E  # [E, ...] on dim 0: expert j's bytes are the j-th E-th
            want |= {(b + j * row, b + (j + 1) * row) for j in kept[layer]}
        else:
            want.add((b, e))
    return base, want


def _covered(ranges) -> set[int]:
    return {i for b, e in ranges for i in range(b, e)}


def test_partial_load_reads_only_the_kept_experts(built, monkeypatch):
    root, model, _, pack = built
    shard = model / "model.safetensors"
    log = ReadLog(shard)
    monkeypatch.setattr(builtins, "open", log.wrap(builtins.open))
    loaded = load_for_task(root / "pack", task="a", ratio=0.75)
    monkeypatch.undo()
    base, want = _expected_ranges(shard, loaded.kept, pack.num_experts)
    data_reads = [(p, p + k) for p, k in log.reads if p >= base and k]
    read = _covered(data_reads)
    assert read == _covered(want)
    assert sum(e - b for b, e in data_reads) == sum(e - b for b, e in want)  # nothing read twice
    assert loaded.bytes_read == sum(e - b for b, e in want)
    full = shard.stat().st_size - base
    assert loaded.bytes_read < full


@torch.no_grad()
def _router_mean(model, ids: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Brute force: per row, the mean over real tokens of softmax(router logits) of `layers`, concatenated."""
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    rows = []
    for r in range(ids.shape[0]):
        real = mask[r].bool()
        blocks = []
        for layer in layers:
            logits = out.router_logits[moe.index(layer)].reshape(ids.shape[0], ids.shape[1], -1)[r][real]
            blocks.append(torch.softmax(logits.double(), dim=-1).mean(0))  # [E]
        rows.append(torch.cat(blocks))
    return torch.stack(rows)


def test_keys_are_mean_router_distributions_and_retrieval_is_nearest(qwen):
    root, model, calib, pack = qwen
    assert pack.routing_kind == "softmax_topk"
    stock = AutoModelForCausalLM.from_pretrained(model).eval()
    sets = build_sets(calib.calib_config(), load_tokenizer(model, None))
    for s in sets:  # the task key: token-weighted mean over every calibration window
        per_row = _router_mean(stock, s.input_ids, s.attention_mask, pack.key_layers)  # [N, K·E]
        w = s.attention_mask.sum(1, keepdim=True).double()
        want = (per_row * w).sum(0) / w.sum()
        torch.testing.assert_close(torch.tensor(pack.tasks[s.name].key, dtype=torch.float64), want,
                                   rtol=1e-5, atol=1e-6)
    ids = sets[0].input_ids[0, :16]
    q = _router_mean(stock, ids[None], torch.ones(1, 16, dtype=torch.long), pack.key_layers)[0]
    keys = {n: torch.tensor(t.key, dtype=torch.float64) for n, t in pack.tasks.items()}
    cos = {n: float(k @ q / (k.norm() * q.norm())) for n, k in keys.items()}
    best = max(cos, key=cos.get)
    loaded = load_for_task(pack, prompt=ids, ratio=0.5, margin=0.0)
    assert loaded.task == best and not loaded.fallback
    assert loaded.margin == pytest.approx(abs(cos["a"] - cos["b"]), abs=1e-6)
    assert loaded.similarities == pytest.approx(cos, abs=1e-6)
    assert 0 < loaded.retrieval_bytes < (model / "model.safetensors").stat().st_size


def test_below_the_margin_the_full_model_is_loaded(built):
    root, model, calib, pack = built
    ids = torch.arange(3, 19)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        loaded = load_for_task(root / "pack", prompt=ids, ratio=0.5, margin=2.0)  # cosines differ by < 2: below
    finally:
        logger.removeHandler(handler)
    assert loaded.task is None and loaded.fallback and loaded.margin < 2.0
    assert any("FULL model" in m for m in seen)
    assert all(len(v) == pack.num_experts for v in loaded.kept.values())
    stock = AutoModelForCausalLM.from_pretrained(model).eval()
    assert torch.equal(_logits(loaded.model, _ids(1)), _logits(stock, _ids(1)))


def test_nearest_on_synthetic_keys():
    g = torch.Generator().manual_seed(0)
    keys = {n: torch.softmax(torch.randn(16, generator=g, dtype=torch.float64) * 3, 0)
            for n in ("code", "chat", "math", "records")}
    for name, k in keys.items():
        q = k + 0.01 * torch.rand(16, generator=g, dtype=torch.float64)
        m = nearest(keys, q)
        cos = {n: float(v @ q / (v.norm() * q.norm())) for n, v in keys.items()}
        ranked = sorted(cos.values(), reverse=True)
        assert m.task == name
        assert m.margin == pytest.approx(ranked[0] - ranked[1], abs=1e-9)
    # halfway between two keys: the margin is ~0 and either may win
    q = keys["code"] / keys["code"].norm() + keys["chat"] / keys["chat"].norm()
    m = nearest(keys, q)
    assert m.task in ("code", "chat") and m.margin < 1e-6
    assert nearest({"only": keys["code"]}, q).margin == float("inf")


def test_cli_build_then_eval_with_the_pack_equals_eval_of_the_export(qwen, tmp_path, capsys):
    root, model, calib, _ = qwen
    from moeprune.cli import main

    a, b = (spec.split("=", 1)[1] for spec in calib.calib)
    pack = tmp_path / "pack"
    assert main(["taskpack", "build", str(model), "--calib", f"a={a}", "--calib", f"b={b}", "--ratios", "0.5",
                 "--samples", "4", "--seq-len", "32", "--out", str(pack)]) == 0
    assert "own-key cosine" in capsys.readouterr().out
    data = ["--data", f"a={a}", "--data", f"b={b}", "--seq-len", "32", "--max-sequences", "3"]
    assert main(["eval", str(model), *data, "--pack", str(pack), "--task", "b", "--json",
                 str(tmp_path / "p.json")]) == 0
    assert main(["taskpack", "export", str(pack), "--task", "b", "--ratio", "0.5", "--out", str(tmp_path / "x")]) == 0
    assert main(["eval", str(tmp_path / "x"), *data, "--json", str(tmp_path / "x.json")]) == 0
    got, want = (json.loads((tmp_path / n).read_text()) for n in ("p.json", "x.json"))
    for d in ("a", "b"):
        assert got[d]["perplexity"] == want[d]["perplexity"]
    assert got["task"]["a"]["task"] == "b" and got["task"]["a"]["bytes_read"] > 0
    assert main(["eval", str(model), *data, "--pack", str(pack), "--task", "auto", "--json",
                 str(tmp_path / "auto.json")]) == 0
    auto = json.loads((tmp_path / "auto.json").read_text())["task"]
    assert set(auto) == {"a", "b"} and all("margin" in v for v in auto.values())
    cmp = tmp_path / "cmp"
    assert main(["compare", str(model), str(model), *data, "--pack", str(pack), "--task", "b", "--out", str(cmp)]) == 0
    rows = {r["domain"]: r for r in json.loads((cmp / "compare.json").read_text())["rows"]}
    assert rows["a"]["perplexity_after"] == got["a"]["perplexity"]  # the second model is the pack's
    assert rows["a"]["perplexity_before"] != rows["a"]["perplexity_after"]

"""`moeprune analyze --offload` end to end on a tiny model: the Offloading section and plot are in the report, the
simulated LRU hit rates equal an LRU written here (OrderedDict) on the held-out routing traces, the predictor
trains on the calibration tokens, the verdict follows the static quality table; without --heldout the calibration
sequences are split; bad offloading options are refused before any model is loaded."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from moeprune.analysis.run import analyze
from moeprune.calibration import run as calib_run
from moeprune.calibration.run import CalibrateOptions
from moeprune.calibration.session import collect
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.offload import OffloadOptions
from moeprune.tiny import save_tiny
from refusal import assert_cli_refused, assert_refused
from textgen import write_words

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("offload")
    write_words(root / "calib.txt", seed=0)
    write_words(root / "test.txt", seed=1)
    save_tiny("qwen3_moe", root / "model", seed=1, with_tokenizer=True)
    return root


def argv(root: Path, out: str, *extra) -> list:
    return ["analyze", root / "model", "--calib", f"words={root / 'calib.txt'}", "--samples", "6", "--seq-len", "32",
            "--out", root / out, *extra]


@pytest.fixture(scope="module")
def report(root) -> dict:
    from moeprune.cli import main

    rc = main([str(a) for a in argv(root, "out", "--offload", "--heldout", f"test={root / 'test.txt'}",
                                    "--static-quality", "0.25=1.01,0.5=1.5", "--quality-target", "1.02")])
    assert rc == 0
    return json.loads((root / "out" / "analysis.json").read_text())


def lru_hits(stream: list[list[int]], m: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hit = 0
    for row in stream:
        for e in sorted(row):
            if e in cache:
                hit += 1
            else:
                while len(cache) >= m:
                    victim = next(e2 for e2 in cache if e2 not in row)
                    del cache[victim]
                cache[e] = None
        for e in sorted(row):
            cache.move_to_end(e)  # a token's experts share its time: ties evict the lowest index first
    return hit


def test_section_plot_and_lru_against_an_independent_lru(root, report):
    o = report["offload"]
    assert o["cache_sizes"] == [2, 4, 8] and o["heldout"] == "heldout"
    assert [(r["m"], r["policy"]) for r in o["rows"]] == [(m, p) for m in (2, 4, 8)
                                                          for p in ("lru", "lfu", "predictive", "oracle", "belady")]
    sections = json.loads((root / "out" / "report.json").read_text())["sections"]
    sec = next(s for s in sections if s["id"] == "offload")
    assert sec["images"][0]["file"] == "offload.png" and (root / "out" / "offload.png").read_bytes()[:8] == PNG
    assert len(sec["tables"][0]["rows"]) == 15 and report["files"]["offload"] == "offload.png"
    # the held-out routing, by the calibration session on its own
    calib = CalibrateOptions((f"test={root / 'test.txt'}",), samples=6, seq_len=32, held_out=0)
    _, _, sets = calib_run.prepare(root / "model", calib)
    model = load_model(root / "model")
    adapter = get_adapter(model.config, model=model)
    traces = collect(model, adapter, sets, trace=True).traces["test"]
    assert o["tokens"] == sum(t.shape[0] for t in traces[adapter.moe_layers()[0]])
    for r in (r for r in o["rows"] if r["policy"] == "lru"):
        for i, layer in enumerate(adapter.moe_layers()):
            stream = torch.cat(traces[layer]).tolist()
            assert r["hit_rate_per_layer"][i] == pytest.approx(lru_hits(stream, r["m"]) / (2 * len(stream)))
    by = {(r["m"], r["policy"]): r for r in o["rows"]}
    for m in (2, 4, 8):
        assert by[(m, "belady")]["hit_rate"] >= max(by[(m, p)]["hit_rate"] for p in ("lru", "lfu"))
        assert by[(m, "belady")]["loads_per_token"] <= min(by[(m, p)]["loads_per_token"] for p in by_policies())
    assert 0 <= o["predictor"]["mean_recall"] <= 1 and len(o["predictor"]["recall"]) == 1  # 2 MoE layers
    # verdict: 0.25 meets ×1.02 -> 6 experts per layer static; m = 2, 4 < 6 -> offloading wins below that memory
    assert o["verdict"]["kind"] == "offload" and o["verdict"]["static_experts"] == 6
    assert "static pruning wins" in o["verdict"]["text"]


def by_policies() -> tuple[str, ...]:
    return ("lru", "lfu", "predictive", "oracle")


def test_without_heldout_the_calibration_sequences_are_split(root):
    calib = CalibrateOptions((f"words={root / 'calib.txt'}",), samples=6, seq_len=32)
    res = analyze(root / "model", calib, root / "split", offload=OffloadOptions(cache_sizes=("k", 3)),
                  lengths=(4, 16))
    o = res.data["offload"]
    assert o["heldout"] == "split" and o["cache_sizes"] == [2, 3]
    assert o["tokens"] == o["train_tokens"] == 3 * 32  # 6 full windows: 3 even-numbered, 3 odd-numbered
    assert o["verdict"]["kind"] == "no-static-quality"


def test_offload_options_are_refused(root, capsys):
    inputs = [root / "model"]
    out = root / "refused"
    assert_cli_refused(argv(root, "refused", "--cache-sizes", "k"), [r"--cache-sizes sets .* add --offload"],
                       capsys, inputs=inputs, out=out)
    assert_cli_refused(argv(root, "refused", "--bandwidth", "10", "--static-quality", "0.5=2"),
                       [r"--bandwidth, --static-quality set .* add --offload"], capsys, inputs=inputs, out=out)
    assert_cli_refused(["analyze", "--stats", root / "x.safetensors", "--out", out, "--offload"],
                       ["statistics file"], capsys, inputs=inputs, out=out)
    assert_cli_refused(argv(root, "refused", "--offload", "--cache-sizes", "1"), [r"k = 2 <= m <= E = 8"], capsys,
                       inputs=inputs, out=out)
    assert_cli_refused(argv(root, "refused", "--offload", "--heldout", "nope"), ["NAME=PATH"], capsys,
                       inputs=inputs, out=out)
    assert_cli_refused(argv(root, "refused", "--offload", "--static-quality", "half"), ["RATIO=PERPLEXITY_RATIO"],
                       capsys, inputs=inputs, out=out)
    assert_cli_refused(argv(root, "refused", "--offload", "--prefetch", "3", "--cache-sizes", "2,4"),
                       ["smallest cache"], capsys, inputs=inputs, out=out)
    one = CalibrateOptions((f"words={root / 'calib.txt'}",), samples=1, seq_len=32)
    assert_refused(lambda: analyze(root / "model", one, out, offload=OffloadOptions()), "splits the calibration",
                   inputs=inputs, out=out)

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
from moeprune.calibration.data import CalibSet
from moeprune.calibration.run import CalibrateOptions
from moeprune.calibration.session import collect
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.offload import OffloadOptions
from moeprune.offload.lookahead import Lookahead
from moeprune.pipeline.verify import seeded_inputs
from moeprune.tiny import save_tiny, tiny_model
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
    policies = ("lru", "lfu", "predictive", "lookahead", "oracle", "belady")
    assert [(r["m"], r["policy"]) for r in o["rows"]] == [(m, p) for m in (2, 4, 8) for p in policies]
    sections = json.loads((root / "out" / "report.json").read_text())["sections"]
    sec = next(s for s in sections if s["id"] == "offload")
    assert sec["images"][0]["file"] == "offload.png" and (root / "out" / "offload.png").read_bytes()[:8] == PNG
    assert len(sec["tables"][0]["rows"]) == 18 and report["files"]["offload"] == "offload.png"
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
    return ("lru", "lfu", "predictive", "lookahead", "oracle")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_lookahead_is_the_next_router_on_the_previous_block_input(family):
    """The guesses for MoE layer ℓ equal layer ℓ's routing rule applied by hand to the input of layer ℓ−1's MoE
    block, captured with a hook during one plain whole-model forward (real tokens of a left-padded batch)."""
    model = tiny_model(family, seed=3).eval()
    adapter = get_adapter(model.config)
    inputs = seeded_inputs(model.config.vocab_size, batch=3, seq_len=12, seed=4)
    sets = [CalibSet("x", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)]
    look = Lookahead()
    collect(model, adapter, sets, batch_size=2, decide=look)
    moe = adapter.moe_layers()
    seen = {}
    hook = adapter.block(model, moe[0]).register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    x = seen["x"].reshape(-1, model.config.hidden_size)  # [B·S, H] layer moe[0]'s MoE input
    gate = adapter.router(adapter.block(model, moe[1]))
    logits = x @ gate.weight.T  # [B·S, E]
    k = adapter.top_k
    if family == "qwen3_moe":
        want = logits.softmax(-1).topk(k, dim=-1).indices
    else:  # deepseek_v3: sigmoid scores + correction bias, best n_group groups by their top-2 sums, then top-k
        cfg = model.config
        scores = logits.sigmoid() + gate.e_score_correction_bias
        groups = scores.view(-1, cfg.n_group, adapter.num_experts // cfg.n_group)  # [T, G, E/G]
        top_groups = groups.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices  # [T, g]
        keep = torch.zeros_like(groups[..., 0]).scatter_(1, top_groups, 1).bool()  # [T, G]
        scores = scores.masked_fill(~keep.repeat_interleave(adapter.num_experts // cfg.n_group, 1), 0.0)
        want = scores.topk(k, dim=-1).indices
    mask = inputs["attention_mask"].reshape(-1).bool()
    got = torch.cat(look.traces["x"][moe[1]])  # [n_real, k]
    assert got.shape == (int(mask.sum()), k)
    assert got.sort(1).values.tolist() == want[mask].sort(1).values.tolist()


def test_without_heldout_the_calibration_sequences_are_split(root):
    calib = CalibrateOptions((f"words={root / 'calib.txt'}",), samples=6, seq_len=32)
    res = analyze(root / "model", calib, root / "split", offload=OffloadOptions(cache_sizes=("k", 3)),
                  lengths=(4, 16))
    o = res.data["offload"]
    assert o["heldout"] == "split" and o["cache_sizes"] == [2, 3]
    assert o["tokens"] == o["train_tokens"] == 3 * 32  # 6 full windows: 3 even-numbered, 3 odd-numbered
    assert o["verdict"]["kind"] == "no-static-quality"
    assert o["lookahead"]["layers"] == o["predictor"]["layers"]  # guesses of the same split
    assert any(r["policy"] == "lookahead" for r in o["rows"])


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

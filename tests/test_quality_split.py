"""The quality figure after `prune`: perplexity before/after on calibration windows held apart from scoring.

The held-apart windows are full windows of real text that the seeded draw did not score (runs of the whole text's
token stream, checked by brute force), and the reported ratio equals a hand-computed perplexity ratio of the two
models."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune.calibration.data import CalibConfig, CalibSource, build_set
from moeprune.cli import main
from moeprune.tiny import save_tiny

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _text(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, 10, (n,), generator=g))


def test_held_apart_windows_are_unsampled_full_windows(tmp_path):
    save_tiny("qwen3_moe", tmp_path / "m", seed=1, with_tokenizer=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(_text(1500, 0))
    cfg = CalibConfig((CalibSource("web", tmp_path / "t.txt"),), samples=5, seq_len=32, held_out=4)
    s = build_set(cfg.sources[0], tok, cfg)
    stream = tok((tmp_path / "t.txt").read_text(), add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        stream = stream + [tok.eos_token_id]
    text = "".join(chr(0x100 + t) for t in stream)  # the stream as a string, to find runs of it

    def runs_of_the_text(row: tuple) -> bool:
        """The window is one run of the whole text's token stream, or two (it spans two sampled text pieces)."""
        w = "".join(chr(0x100 + t) for t in row)
        return any(w[:cut] in text and w[cut:] in text for cut in range(len(w) + 1))

    sampled = {tuple(r.tolist()) for r in s.input_ids}
    held = [tuple(r.tolist()) for r in s.held_out_ids]
    assert s.meta["sampled"]  # 1500 words: far more text than 5 windows need; only sampled pieces are tokenised
    assert len(held) == 4 and len(set(held)) == 4 and all(len(w) == 32 for w in held)
    assert all(runs_of_the_text(w) for w in [*held, *sampled])
    assert not set(held) & sampled
    without = build_set(cfg.sources[0], tok, CalibConfig(cfg.sources, samples=5, seq_len=32))
    assert torch.equal(without.input_ids, s.input_ids) and without.sha256 == s.sha256  # scoring unchanged


def _ppl(model, rows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=rows).logits.double()  # [M, L, V]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
    return math.exp(float(nll) / rows[:, 1:].numel())


def test_prune_reports_the_calibration_split_ratio(tmp_path, capsys):
    src = save_tiny("qwen3_moe", tmp_path / "m", seed=1, with_tokenizer=True)
    (tmp_path / "t.txt").write_text(_text(2500, 1))
    out = tmp_path / "out"
    argv = ["prune", str(src), "--method", "reap", "--ratio", "0.5", "--calib", f"web={tmp_path / 't.txt'}",
            "--samples", "6", "--seq-len", "32", "--held-out", "5", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held apart from the scored windows" in printed and "web: perplexity" in printed
    split = json.loads((out / "moeprune_report.json").read_text())["calibration_split"]["sets"]["web"]
    tok = AutoTokenizer.from_pretrained(src)
    cfg = CalibConfig((CalibSource("web", tmp_path / "t.txt"),), samples=6, seq_len=32, held_out=5)
    rows = build_set(cfg.sources[0], tok, cfg).held_out_ids
    before = _ppl(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), rows)
    after = _ppl(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), rows)
    assert split["windows"] == 5 and split["tokens"] == rows[:, 1:].numel()
    assert math.isclose(split["perplexity_before"], before, rel_tol=1e-6)
    assert math.isclose(split["ratio"], after / before, rel_tol=1e-6) and split["ratio"] != 1.0
    assert main([*argv[:-2], "--held-out", "0", "--out", str(tmp_path / "quiet")]) == 0
    assert "held apart" not in capsys.readouterr().out

"""`moeprune eval` against a direct computation: the mean token NLL of every window of the held-out text, each
window (and the unpadded tail) run alone through the model, cross-entropy applied by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.eval.run import EvalOptions, evaluate
from moeprune.io.load import load_model
from moeprune.tiny import save_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ckpt = save_tiny("olmoe", root / "m", with_tokenizer=True)
    web = root / "web.txt"
    web.write_text(" ".join(f"word{i % 13} is {i}." for i in range(60)))
    return root, ckpt, web


def reference(ckpt, text: str, seq_len: int) -> tuple[float, int, int]:
    """(NLL sum, correct, counted) with every window run alone; the tail window unpadded."""
    tok = tiny_tokenizer()
    stream = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model = load_model(ckpt, dtype="float32")
    windows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # [L, V]
            for t in range(len(w) - 1):
                nll -= float(logp[t, w[t + 1]])
                correct += int(logp[t].argmax() == w[t + 1])
                n += 1
    return nll, correct, n


def test_eval_equals_direct_nll(setup):
    root, ckpt, web = setup
    seq_len = 48
    result = evaluate(ckpt, EvalOptions((f"web={web}",), seq_len=seq_len, batch_size=3))
    nll, correct, n = reference(ckpt, web.read_text(), seq_len)
    got = result.scores["web"]
    assert n % (seq_len - 1) != 0, "the text must leave a padded tail, or padding is not tested"
    assert got.tokens == n
    assert got.nll_sum == pytest.approx(nll, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got.accuracy == pytest.approx(correct / n)


def test_eval_cli_json_and_samples(setup, tmp_path, capsys):
    root, ckpt, web = setup
    out = tmp_path / "e.json"
    assert main(["eval", str(ckpt), "--data", f"web={web}", "--data", f"again={web}", "--seq-len", "32",
                 "--prompt", "word1 is", "--max-new-tokens", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"web", "again"} and data["web"] == data["again"]
    assert set(data["web"]) == {"perplexity", "accuracy", "tokens"} and data["web"]["tokens"] > 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "'word1 is'" in printed


def test_eval_bad_input_before_loading(setup, tmp_path, monkeypatch):
    root, ckpt, web = setup
    from moeprune.eval import run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "empty-cache"))  # no testbed to default to
    with pytest.raises(MoePruneError, match="no evaluation data: pass --data"):
        evaluate(ckpt, EvalOptions(()))
    with pytest.raises(MoePruneError, match="--data web: .* does not exist"):
        evaluate(ckpt, EvalOptions((f"web={tmp_path / 'none.txt'}",)))
    with pytest.raises(MoePruneError, match="does not exist; create it"):
        evaluate(ckpt, EvalOptions((f"web={web}",)), tmp_path / "no" / "e.json")
    with pytest.raises(MoePruneError, match="tokenizer"):
        evaluate(save_tiny("olmoe", tmp_path / "bare"), EvalOptions((f"web={web}",)))


def test_compare_writes_table_report_and_plot(setup, tmp_path, capsys):
    from moeprune import api

    root, ckpt, web = setup
    pruned = tmp_path / "pruned"
    api.prune(ckpt, pruned, method="aimer", ratio=0.5, run_verify=False)
    out = tmp_path / "cmp"
    assert main(["compare", str(ckpt), str(pruned), "--data", f"web={web}", "--seq-len", "32", "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    opts = EvalOptions((f"web={web}",), seq_len=32)
    before, after = (evaluate(p, opts).scores["web"] for p in (ckpt, pruned))
    assert rows[0]["perplexity_ratio"] == pytest.approx(after.perplexity / before.perplexity)
    assert rows[0]["perplexity_ratio"] != pytest.approx(1.0, abs=1e-6)  # pruning half the experts shows
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| web |" in (out / "compare.md").read_text() and "aimer at ratio 0.5" in capsys.readouterr().out
    assert main(["compare", str(ckpt), str(pruned), "--data", f"web={web}", "--out", str(out)]) == 2  # exists

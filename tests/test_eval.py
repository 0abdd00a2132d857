"""`moeprune eval` against a direct computation: the mean token NLL of every window of the held-out text, each
window (and the unpadded tail) run alone through the model, cross-entropy applied by hand."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.eval.compare import compare
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
    with pytest.raises(MoePruneError, match="no evaluation data for .*Pass --data NAME=PATH"):
        evaluate(ckpt, EvalOptions(()))
    with pytest.raises(MoePruneError, match="--data web: .* does not exist"):
        evaluate(ckpt, EvalOptions((f"web={tmp_path / 'none.txt'}",)))
    noise = tmp_path / "noise.txt.gz"
    noise.write_bytes(gzip.compress(bytes(range(256))))
    with pytest.raises(MoePruneError, match=f"--data web: {noise} is not text"):
        evaluate(ckpt, EvalOptions((f"web={noise}",)))
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


def mark_as_testbed(folder, text: str, seq_len: int = 24):
    """Make `folder` look like a moeprune testbed: a testbed.json whose one held-out domain `web` is `text`."""
    from moeprune.testbed.build import SCHEMA, TESTBED_FILE

    (folder / "data").mkdir()
    (folder / "data" / "web.heldout.txt").write_text(text)
    meta = {"schema": SCHEMA, "home": str(folder), "config": {"seq_len": seq_len},
            "domains": {"web": {"files": {"heldout": "data/web.heldout.txt", "calib": "data/web.heldout.txt"}}}}
    (folder / TESTBED_FILE).write_text(json.dumps(meta))
    return folder


@pytest.fixture
def testbed_and_stranger(setup, tmp_path, monkeypatch):
    """A (fake) testbed sitting in the default cache folder, a model pruned from it, and an unrelated model."""
    from moeprune import api
    from moeprune.testbed.build import default_dir

    root, ckpt, web = setup
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    default_dir().parent.mkdir(parents=True)
    tb = mark_as_testbed(Path(shutil.copytree(ckpt, default_dir())), web.read_text())
    pruned = tmp_path / "pruned"
    api.prune(tb, pruned, method="aimer", ratio=0.5, run_verify=False)
    return tb, pruned, ckpt


def test_eval_default_data_only_for_the_testbed_and_its_exports(testbed_and_stranger, setup, tmp_path):
    tb, pruned, stranger = testbed_and_stranger
    explicit = EvalOptions((f"web={setup[2]}",), seq_len=24)
    for model in (tb, pruned):  # the testbed and its export: its held-out text at its training length
        assert evaluate(model, EvalOptions()).to_dict() == evaluate(model, explicit).to_dict()
    assert (pruned / "testbed.json").is_file()
    with pytest.raises(MoePruneError, match=f"no evaluation data for {stranger}: .*Pass --data NAME=PATH"):
        evaluate(stranger, EvalOptions())  # the cached testbed exists, but this model is not made from it
    assert main(["eval", str(stranger)]) == 2


def test_compare_default_data_needs_both_models_from_the_testbed(testbed_and_stranger, tmp_path):
    tb, pruned, stranger = testbed_and_stranger
    out = tmp_path / "cmp"
    result = compare(tb, pruned, EvalOptions(), out)
    direct = {m: evaluate(m, EvalOptions()).scores["web"].perplexity for m in (tb, pruned)}
    assert result.rows()[0]["perplexity_ratio"] == pytest.approx(direct[pruned] / direct[tb], rel=1e-9)
    for a, b in ((stranger, pruned), (tb, stranger)):
        with pytest.raises(MoePruneError, match=f"no evaluation data for {stranger}: .*Pass --data"):
            compare(a, b, EvalOptions(), tmp_path / "cmp2")
    assert not (tmp_path / "cmp2").exists()
    other = mark_as_testbed(Path(shutil.copytree(stranger, tmp_path / "other-testbed")), "another text")
    with pytest.raises(MoePruneError, match="come from different testbeds"):
        compare(tb, other, EvalOptions(), tmp_path / "cmp2")

"""Routing policies through the CLI: `plan` (a given p, or a policy fitted on calibration text as `prune` fits it),
`apply`, `verify` and `eval --routing`. The references: stock verification of the applied export, and the plan and
export `prune` makes from the same options and text."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moeprune.cli import main
from moeprune.tiny import save_tiny
from test_routing_policies import FAMILIES
from textgen import write_words


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing_cli")
    write_words(root / "web.txt")
    return root


def test_cli_plan_apply_verify_and_eval_routing(root, tmp_path, capsys):
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, with_tokenizer=True, **FAMILIES["qwen3_moe"])
    assert main(["plan", str(src), "--method", "top_p", "--p", "0.6", "--out", str(tmp_path / "p.json")]) == 0
    assert main(["apply", str(src), "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "dyn")]) == 0
    assert main(["verify", str(src), str(tmp_path / "dyn")]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["eval", str(src), "--data", f"web={root / 'web.txt'}", "--seq-len", "32", "--max-sequences", "2",
                 "--routing", str(tmp_path / "p.json"), "--json", str(tmp_path / "e.json")]) == 0
    assert "experts per token active" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["routing"]["method"] == "top_p"
    bad = ["prune", str(src), "--method", "topk", "--k", "2", "--ratio", "0.25", "--out", str(tmp_path / "x")]
    assert main(bad) == 2


def test_cli_plan_fits_a_policy_on_calibration_text_as_prune_does(root, tmp_path):
    """`moeprune plan MODEL --method naee_skip --target-active A --calib ...` observes the checkpoint itself (no
    statistics file): the same plan as `prune` fits on the same text, and applying it gives prune's export."""
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, with_tokenizer=True, **FAMILIES["qwen3_moe"])
    opts = ["--calib", f"web={root / 'web.txt'}", "--samples", "6", "--seq-len", "48"]
    policy = ["--method", "naee_skip", "--target-active", "1.5"]
    assert main(["plan", str(src), *policy, *opts, "--out", str(tmp_path / "p.json")]) == 0
    assert main(["prune", str(src), *policy, *opts, "--out", str(tmp_path / "pruned"), "--no-verify"]) == 0
    got = json.loads((tmp_path / "p.json").read_text())
    want = json.loads((tmp_path / "pruned" / "moeprune_plans" / "1-routing.json").read_text())
    assert got["thresholds"] and got["thresholds"] == want["thresholds"] and got["beta"] == want["beta"]
    assert main(["apply", str(src), "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "applied")]) == 0
    config = [json.loads((tmp_path / d / "config.json").read_text())["moeprune_routing"] for d in ("applied", "pruned")]
    assert config[0]["thresholds"] == config[1]["thresholds"]
    a, b = (load_file(next((tmp_path / d).glob("model*.safetensors"))) for d in ("applied", "pruned"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["plan", str(src), "--method", "top_p", "--p", "0.6", *opts, "--out", str(tmp_path / "q.json")]) == 2

"""The analysis report bundles prune / merge / compare results: a real `prune` + `compare` of a tiny model, then
`analyze --results` puts their numbers (read back from their own files) and the comparison plot into report.html;
a folder without results is refused before any work."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import torch

from moeprune.cli import main
from moeprune.tiny import save_tiny

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


class Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.images = [], []

    def handle_data(self, data):
        self.text.append(data)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_analyze_report_includes_prune_merge_and_compare_results(tmp_path):
    g = torch.Generator().manual_seed(0)
    web = tmp_path / "web.txt"
    web.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 10, (1500,), generator=g)))
    src = save_tiny("qwen3_moe", tmp_path / "m", seed=1, with_tokenizer=True)
    calib = ["--calib", f"web={web}", "--samples", "4", "--seq-len", "32"]
    assert main(["prune", str(src), "--method", "frequency", "--ratio", "0.25", *calib,
                 "--out", str(tmp_path / "pruned")]) == 0
    assert main(["prune", str(src), "--method", "msmoe", "--ratio", "0.5", *calib,
                 "--out", str(tmp_path / "merged")]) == 0
    assert main(["compare", str(src), str(tmp_path / "pruned"), "--data", f"web={web}", "--seq-len", "32",
                 "--max-sequences", "4", "--out", str(tmp_path / "cmp")]) == 0
    out = tmp_path / "analysis"
    assert main(["analyze", "--stats", str(tmp_path / "pruned" / "moeprune_stats.safetensors"), "--out", str(out),
                 "--ratios", "0.25,0.5", "--results", str(tmp_path / "cmp"), "--results", str(tmp_path / "pruned"),
                 "--results", str(tmp_path / "merged")]) == 0
    page = Text()
    page.feed((out / "report.html").read_text())
    text = " ".join(page.text)
    cmp_rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert f"{cmp_rows[0]['perplexity_ratio']:.4g}" in text  # the comparison's own number, formatted by the page
    merged = json.loads((tmp_path / "merged" / "moeprune_report.json").read_text())
    assert "msmoe" in text and "average / dominant" in text and f"{merged['num_experts_before']} → 4" in text
    assert "frequency" in text and "PASS" in text
    assert "result_1_compare.png" in page.images and (out / "result_1_compare.png").is_file()
    assert (out / "result_1_compare.png").read_bytes() == (tmp_path / "cmp" / "compare.png").read_bytes()
    assert all((out / img).is_file() for img in page.images)


def test_analyze_refuses_a_results_folder_without_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    stats = tmp_path / "missing.safetensors"
    assert main(["analyze", "--stats", str(stats), "--out", str(tmp_path / "o"),
                 "--results", str(tmp_path / "empty")]) == 2
    assert "compare.json or moeprune_report.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

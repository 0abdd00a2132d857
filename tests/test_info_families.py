"""`moeprune info` says which methods a model's layout allows, and `info --families` lists every model type
moeprune supports or refuses (with the reason)."""

from __future__ import annotations

from moeprune.cli import main
from moeprune.tiny_families import tiny_family_model


def test_info_prints_the_methods_the_layout_allows(tmp_path, capsys):
    up_only = tmp_path / "nemotron_h"
    tiny_family_model("nemotron_h", seed=0).save_pretrained(up_only)
    assert main(["info", str(up_only)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("methods"))
    assert "experts, naee, neurons, repair, lazy" in line
    assert "no merge:" in line and "up-only" in line  # nemotron_h's experts have no gate projection
    gated = tmp_path / "qwen3_moe"
    tiny_family_model("qwen3_moe", seed=0).save_pretrained(gated)
    assert main(["info", str(gated), "--json"]) == 0
    import json

    verbs = json.loads(capsys.readouterr().out)["verbs"]
    assert verbs == {"experts": None, "naee": None, "neurons": None, "merge": None, "repair": None, "lazy": None}


def test_info_families_lists_supported_and_refused(capsys):
    assert main(["info", "--families"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and line[0].islower()}
    assert "hand-written" in rows["qwen3_moe"]
    assert "structure + data" in rows["ernie4_5_moe"]
    assert "REFUSED" in rows["deepseek_v4"] and "hash" in rows["deepseek_v4"]
    assert main(["info"]) == 2  # neither a model nor --families
    assert "--families" in capsys.readouterr().err

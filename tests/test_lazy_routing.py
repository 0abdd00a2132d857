"""Routing policies fitted layer by layer (`--lazy`): the router weights captured one decoder layer at a time are
those of the whole-model forward, so the thresholds, the export and its verification equal the in-memory run's;
otp (trained through whole-model forwards) is refused before any work."""

from __future__ import annotations

import json

import pytest

from moeprune.pipeline.run import prune
from moeprune.tiny import save_tiny
from refusal import assert_refused
from test_layered import assert_same_export, calib
from textgen import write_words

RECIPES = {
    "top_p": [{"method": "top_p", "target_active": 1.5}],
    "naee_skip": [{"method": "reap", "ratio": 0.25}, {"method": "naee_skip", "target_active": 1.4,
                                                       "scope": "global"}],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy_routing")
    write_words(root / "web.txt", n=1500)
    return root


# deepseek_v3 with a policy after expert removal fails verification in memory too (the group-limited router's
# reference with removed experts masked; models/dynamic.py), so it is checked with the policy alone here
@pytest.mark.parametrize("family,recipe", [("qwen3_moe", "top_p"), ("qwen3_moe", "naee_skip"), ("gpt_oss", "top_p"),
                                           ("gpt_oss", "naee_skip"), ("deepseek_v3", "top_p")])
def test_lazy_routing_fit_equals_in_memory(root, tmp_path, family, recipe):
    src = save_tiny(family, tmp_path / "src", seed=3, with_tokenizer=True)
    opts = calib(root)
    mem = prune(src, tmp_path / "mem", RECIPES[recipe], calib=opts, lazy=False, run_verify=False)[0].out
    lay, result = prune(src, tmp_path / "lay", RECIPES[recipe], calib=opts, lazy=True)
    assert result.passed and result.layer_max_abs_diff  # verified layer by layer
    n = len(RECIPES[recipe])
    want = json.loads((mem / "moeprune_plans" / f"{n}-routing.json").read_text())
    got = json.loads((lay.out / "moeprune_plans" / f"{n}-routing.json").read_text())
    assert want["thresholds"] and got == want
    assert_same_export(mem, lay.out)


def test_lazy_otp_is_refused_before_work(root, tmp_path, no_work):
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, with_tokenizer=True)
    assert_refused(lambda: prune(src, tmp_path / "out", [{"method": "otp", "target_active": 1.5}], calib=calib(root),
                                 lazy=True), r"otp trains its selectors on the whole model.*drop --lazy",
                   inputs=[src], out=tmp_path / "out")

"""Every MoE family of the installed transformers, through every verb (benchmarks/families.py does the work).

The families are enumerated from the installed transformers, not from a hand list. For each one moeprune
supports (a registered adapter), every verb must pass or be declared not applicable by its layout: keep-all
bit-exact; 25 % removal -> stock reload == the original with the removed experts masked in its own router;
streaming == in-memory bit for bit; CAMERA-P and M-SMoE exports verified against their references; layer-by-layer
calibration == in-memory calibration, and HEAPr's layer-by-layer gradient sums == one whole-model backward. A
refused family must be refused with its reason. At least 45 families pass.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from moeprune.models.families import REFUSED
from moeprune.models.registry import ADAPTERS
from moeprune.tiny_families import NOT_BUILDABLE, tiny_family_config

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "families.py"


def _harness():
    spec = importlib.util.spec_from_file_location("families_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


families = _harness()
TYPES = families.families_to_check()
RESULTS: dict[str, dict] = {}  # model_type -> verb -> (status, detail), each family checked once per session


def result(model_type: str, tmp_path_factory) -> dict:
    if model_type not in RESULTS:
        RESULTS[model_type] = families.check_family(model_type, tmp_path_factory.mktemp(model_type))
    return RESULTS[model_type]


def _types(model_type: str) -> set[str]:
    """The model type and its text sub-model's type (a wrapper is served by its text model's adapter)."""
    if model_type in NOT_BUILDABLE:
        return {model_type}
    config = tiny_family_config(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {model_type, getattr(text, "model_type", model_type)}


@pytest.mark.parametrize("model_type", TYPES)
def test_family(model_type, tmp_path_factory):
    row = result(model_type, tmp_path_factory)
    statuses = {s for s, _ in row.values()}
    types = _types(model_type)
    if types & set(REFUSED):  # refused with its reason, on every verb
        assert statuses == {"unsupported"}, row
        assert all("cannot be pruned by moeprune" in d for _, d in row.values()), row
    elif model_type in NOT_BUILDABLE:  # this transformers cannot build it tiny here: said, not hidden
        assert statuses == {"not built"}, row
    elif not types & set(ADAPTERS):  # a family moeprune does not know: a clear refusal, never a silent export
        assert statuses == {"unsupported"}, row
        assert all("unknown MoE architecture" in d or "cannot" in d for _, d in row.values()), row
    else:
        bad = {v: d for v, (s, d) in row.items() if s not in ("pass", "n/a")}
        assert not bad, bad
        assert row["prune"][0] == "pass" and row["streaming"][0] == "pass"  # expert removal: every family


def test_at_least_45_families_pass_every_verb_their_layout_allows(tmp_path_factory):
    rows = {mt: result(mt, tmp_path_factory) for mt in TYPES}
    passing = [mt for mt, row in rows.items() if all(s in ("pass", "n/a") for s, _ in row.values())]
    assert len(passing) >= 45, (len(passing), sorted(set(rows) - set(passing)))


def test_families_missing_from_transformers_are_skipped_with_the_reason(monkeypatch):
    """A family of another transformers release (registered here, not defined by the installed one) is reported
    as skipped, naming the installed version, not run or hidden."""
    import transformers

    from moeprune import compat

    installed = {mt: name for mt, name in compat.CONFIG_MAPPING_NAMES.items() if mt != "qwen3_moe"}
    monkeypatch.setattr(compat, "CONFIG_MAPPING_NAMES", installed, raising=False)
    skipped = families.not_installed()
    assert set(skipped) == {"qwen3_moe"}
    assert skipped["qwen3_moe"] == ("skipped", f"not defined by the installed transformers {transformers.__version__}")

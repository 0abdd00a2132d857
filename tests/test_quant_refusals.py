"""Bad input to quantization: each a clear MoePruneError (CLI exit 2) before any load, calibration or write."""

from __future__ import annotations

import json

import pytest

from moeprune import api
from moeprune.tiny import save_tiny
from refusal import assert_cli_refused, assert_refused

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-refusals")
    (root / "web.txt").write_text("alpha beta gamma delta " * 300)
    save_tiny("qwen3_moe", root / "src", seed=2, with_tokenizer=True)
    save_tiny("gpt_oss", root / "fused", seed=2)
    api.quantize(root / "src", root / "quantized", scheme="w4a16", group_size=8, run_verify=False)
    return root


def test_already_quantized_input_refused(root, capsys, no_work):
    assert_cli_refused(["quantize", root / "quantized", "--group-size", "8", "--out", root / "again"],
                       ["already quantized", "compressed-tensors", "bf16/fp16"], capsys,
                       inputs=[root / "quantized"], out=root / "again")


def test_bit_width_the_format_cannot_store(root, no_work):
    assert_refused(lambda: api.quantize(root / "src", root / "o", group_size=8, bits={1: 16}),
                   r"16 bits: compressed-tensors' pack-quantized format stores integer weights of 2..8 bits",
                   inputs=[root / "src"], out=root / "o")
    assert_refused(lambda: api.quantize(root / "src", root / "o", scheme="w16a16"), "unknown quantization scheme",
                   inputs=[root / "src"], out=root / "o")


def test_gptq_without_calibration(root, capsys, no_work):
    assert_cli_refused(["quantize", root / "src", "--algorithm", "gptq", "--group-size", "8", "--out", root / "o"],
                       ["needs calibration data", "--calib"], capsys, inputs=[root / "src"], out=root / "o")


def test_output_inside_the_input(root, capsys, no_work):
    assert_cli_refused(["quantize", root / "src", "--group-size", "8", "--out", root / "src" / "w4"],
                       ["inside it", "never writes there"], capsys, inputs=[root / "src"], out=root / "src" / "w4")


def test_group_size_must_divide_the_input_features(root, capsys, no_work):
    assert_cli_refused(["quantize", root / "src", "--group-size", "12", "--out", root / "o"],
                       ["group size 12 does not divide the 32 input features"], capsys, inputs=[root / "src"],
                       out=root / "o")


def test_quantization_must_be_the_last_stage(root, no_work):
    recipe = [{"method": "quantize", "scheme": "w4a16", "group_size": 8}, {"method": "frequency", "ratio": 0.25}]
    assert_refused(lambda: api.prune(root / "src", root / "o", recipe, calib=None),
                   "quantization must be the recipe's last stage", inputs=[root / "src"], out=root / "o")


def test_gptq_options_refused_for_rtn_and_families_fused_on_disk(root, no_work):
    assert_refused(lambda: api.quantize(root / "src", root / "o", group_size=8, act_order=True),
                   "GPTQ's; drop them or use algorithm gptq", inputs=[root / "src"], out=root / "o")
    assert_refused(lambda: api.quantize(root / "fused", root / "o", group_size=8),
                   "stores its routed experts fused on disk", inputs=[root / "fused"], out=root / "o")


def test_quantized_export_is_marked_and_input_untouched(root):
    cfg = json.loads((root / "quantized" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "quantization_config" not in json.loads((root / "src" / "config.json").read_text())

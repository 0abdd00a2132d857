"""A lazy run whose last stage plans layer by layer (wanda) writes its export during that stage's planning pass
(`pipeline/fused.py`). The reference is the in-memory run of the same recipe (whole model loaded, `apply_chain`,
`save_pretrained`): the same on-disk tensors, config, stock reload and logits (`assert_same_export`). The report
says how many decoder layers the pass wrote, counted here from the config (the MoE layers, which are the layers the
pass visits with a plan). Where the pass cannot hold a layer as the export reads it, it writes nothing and the
export reads the checkpoint again, with the same result; a failure part-way leaves no output and no temporary
folder, and an earlier output in its place untouched."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moeprune.calibration.run import CalibrateOptions
from moeprune.errors import MoePruneError
from moeprune.io import safetensors_io
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.layered_export import LayerExport
from moeprune.models import get_adapter
from moeprune.pipeline.run import prune
from moeprune.tiny import save_tiny
from test_layered import assert_same_export
from textgen import write_words

WANDA = [{"method": "wanda", "sparsity": 0.5}]
REAP_OWL = [{"method": "reap", "ratio": 0.25}, {"method": "wanda", "sparsity": 0.6, "owl": True}]
CAMERA = [{"method": "camera", "ratio": 0.5}]
REAP_CAMERA = [{"method": "reap", "ratio": 0.25}, {"method": "camera", "ratio": 0.5}]
MSMOE_COMPRESS = [{"method": "msmoe", "ratio": 0.25}, {"method": "compress", "rank": 3, "sparsity": 0.8}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    write_words(root / "web.txt", n=1500)
    return root


def _calib(root, dtype="auto") -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=4, seq_len=32, dtype=dtype)


def _moe_layers(src) -> int:
    """MoE decoder layers from config.json alone: Qwen3-MoE's mlp_only_layers / decoder_sparse_step, DeepSeek's
    first_k_dense_replace, every layer otherwise."""
    cfg = json.loads((src / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    if "first_k_dense_replace" in cfg:
        return n - cfg["first_k_dense_replace"]
    step = cfg.get("decoder_sparse_step", 1)
    return sum(1 for i in range(n) if i not in cfg.get("mlp_only_layers", []) and (i + 1) % step == 0)


def _written(out) -> int:
    return json.loads((out / "moeprune_report.json").read_text())["layers_written_while_planning"]


@pytest.mark.parametrize(("family", "recipe"), [("qwen3_moe", WANDA), ("deepseek_v3", REAP_OWL), ("gpt_oss", WANDA),
                                               ("qwen3_moe", CAMERA), ("mixtral", REAP_CAMERA),
                                               ("deepseek_v3", REAP_CAMERA), ("qwen3_moe", MSMOE_COMPRESS),
                                               ("gpt_oss", MSMOE_COMPRESS)])
def test_the_export_written_while_planning_equals_the_in_memory_one(root, tmp_path, family, recipe):
    src = save_tiny(family, tmp_path / "src", seed=3, with_tokenizer=True)
    mem = prune(src, tmp_path / "mem", recipe, calib=_calib(root), lazy=False, run_verify=False)[0].out
    lay, result = prune(src, tmp_path / "lay", recipe, calib=_calib(root), lazy=True)
    assert _written(lay.out) == _moe_layers(src) > 0
    assert result.passed
    assert_same_export(mem, lay.out)
    for f in sorted((mem / "moeprune_plans").glob("*.json")):  # and the same plans
        assert json.loads(f.read_text()) == json.loads((lay.out / "moeprune_plans" / f.name).read_text()), f.name


def test_only_stages_that_plan_layer_by_layer_write_while_planning(root, tmp_path):
    """HEAPr (gradients arrive top down) and a global neuron budget (every layer's scores first) export after
    planning; the export is the in-memory one all the same."""
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, with_tokenizer=True)
    for recipe in ([{"method": "heapr", "ratio": 0.5}], [{"method": "camera", "ratio": 0.5, "budget": "global"}]):
        name = recipe[0]["method"] + recipe[0].get("budget", "")
        mem = prune(src, tmp_path / f"mem-{name}", recipe, calib=_calib(root), lazy=False, run_verify=False)[0].out
        lay = prune(src, tmp_path / f"lay-{name}", recipe, calib=_calib(root), lazy=True, run_verify=False)[0].out
        assert _written(lay) == 0
        assert_same_export(mem, lay)


def test_bf16_source_stored_dtype_is_written_while_planning_and_float32_is_not(root, tmp_path):
    """A pass computing in float32 holds wider layers than the export reads: refused up front (nothing written
    during it); in the stored dtype it writes every MoE layer. Both equal their in-memory runs."""
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, dtype=torch.bfloat16, with_tokenizer=True)
    for dtype, written in (("stored", _moe_layers(src)), ("float32", 0)):
        mem = prune(src, tmp_path / f"mem-{dtype}", WANDA, calib=_calib(root, dtype), lazy=False,
                    run_verify=False)[0].out
        lay = prune(src, tmp_path / f"lay-{dtype}", WANDA, calib=_calib(root, dtype), lazy=True,
                    run_verify=False)[0].out
        assert _written(lay) == written
        assert_same_export(mem, lay)


def test_a_layer_held_wider_after_earlier_stages_stops_the_pass_writing(root, tmp_path):
    """bf16 DeepSeek-V3: transformers holds e_score_correction_bias in float32, so after an earlier stage the pass's
    layers are not the export's; the pass deletes what it wrote and the export reads every layer again."""
    src = save_tiny("deepseek_v3", tmp_path / "src", seed=3, dtype=torch.bfloat16, with_tokenizer=True)
    recipe = [{"method": "reap", "ratio": 0.25}, {"method": "wanda", "sparsity": 0.5}]
    mem = prune(src, tmp_path / "mem", recipe, calib=_calib(root, "stored"), lazy=False, run_verify=False)[0].out
    lay = prune(src, tmp_path / "lay", recipe, calib=_calib(root, "stored"), lazy=True, run_verify=False)[0].out
    assert _written(lay) == 0
    assert_same_export(mem, lay)


def test_a_failure_during_the_pass_leaves_nothing_and_keeps_the_earlier_output(root, tmp_path, monkeypatch):
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, with_tokenizer=True)
    out = tmp_path / "out"
    prune(src, out, WANDA, calib=_calib(root), lazy=True, run_verify=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = []
    real = LayerExport.write_layer

    def failing(self, i, apply):
        calls.append(i)
        if len(calls) == 2:
            raise MoePruneError("disk full")
        real(self, i, apply)

    monkeypatch.setattr(LayerExport, "write_layer", failing)
    with pytest.raises(MoePruneError, match="disk full"):
        prune(src, out, [{"method": "wanda", "sparsity": 0.3}], calib=_calib(root), lazy=True, run_verify=False,
              overwrite=True)
    assert len(calls) == 2  # it failed inside the planning pass, after one layer was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folder left
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(("family", "recipe", "passes"), [("qwen3_moe", REAP_CAMERA, 2), ("mixtral", REAP_OWL, 3)])
def test_stages_after_a_removal_read_only_the_kept_experts(root, tmp_path, monkeypatch, family, recipe, passes):
    """After expert removal, a lazy run's later passes read the model through a view of the shards that leaves the
    removed experts out (`Stage.shard_view`). Every byte range read from the shards is recorded: each removed
    expert's tensors are read by the first pass only, each kept expert's by every pass (OWL visits each layer
    twice: its outlier ratios, then the masks). The export still equals the in-memory run's."""
    src = save_tiny(family, tmp_path / "src", seed=3, with_tokenizer=True)
    reads: list[tuple[str, int, int]] = []
    real = safetensors_io._fill

    def recording(path, ranges, view):
        reads.extend((str(path), b, e) for b, e in ranges)
        real(path, ranges, view)

    monkeypatch.setattr(safetensors_io, "_fill", recording)
    calib = dataclasses.replace(_calib(root), held_out=0)  # no held-out scoring pass over the original
    lay = prune(src, tmp_path / "lay", recipe, calib=calib, lazy=True, run_verify=False)[0].out
    monkeypatch.setattr(safetensors_io, "_fill", real)
    kept = json.loads((lay / "moeprune_plans" / "1-experts.json").read_text())["kept_experts"]
    ckpt = Checkpoint.open(src)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    times = {True: set(), False: set()}
    for e in ckpt.entries:
        role = adapter.classify_key(e.name)
        if role.kind == "expert":
            n = sum(1 for path, b, end in reads if path == str(e.file) and b < e.end and e.begin < end)
            times[role.expert in kept[str(role.layer)]].add(n)
    assert times == {True: {passes}, False: {1}}
    mem = prune(src, tmp_path / "mem", recipe, calib=calib, lazy=False, run_verify=False)[0].out
    assert_same_export(mem, lay)

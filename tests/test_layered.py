"""Every stage applied one decoder layer at a time, on all 8 families.

The reference is always the existing whole-model in-memory path (load, `apply_chain`, `save_pretrained`):
- the layer-by-layer export (`export(..., lazy=True)`, io/layered_export.py) writes the same on-disk tensors (names,
  dtypes, values) and config, and its stock reload has the in-memory export's state dict and logits, for expert
  removal, every merge family, uniform and non-uniform neuron plans and two-stage recipes (NAEE then a merge,
  a merge then neurons);
- lazy recipe calibration of stage 2 (the original read lazily, stage 1 applied layer by layer) gives the
  statistics of the in-memory replay, and so do the data-free weight summaries;
- `LazyModel.layer(i)` reads the original again after a layer was changed in memory.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from moeprune import api
from moeprune.calibration.run import CalibrateOptions, calibrate, prepare
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.layered_export import _write_config
from moeprune.io.lazy import load_lazy
from moeprune.io.load import load_model
from moeprune.io.nonuniform_config import is_nonuniform
from moeprune.merge.build import make_merge_plan
from moeprune.models import get_adapter
from moeprune.pipeline.context import StageContext
from moeprune.pipeline.recipe import chain_adapters
from moeprune.pipeline.run import apply, prune
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.select.build import build_plan
from moeprune.stages.experts import EXPERTS
from moeprune.stages.merge import MERGE
from moeprune.stages.neurons import NEURONS
from moeprune.tiny import FAMILY_CONFIGS, save_tiny
from textgen import write_words

FAMILIES = list(FAMILY_CONFIGS)
SINGLE = ("reap", "msmoe", "hcsmoe_weighted", "submoe", "dern", "heapr", "camera_layer")
RECIPES = {
    "naee-dern": [{"method": "naee", "ratio": 0.25}, {"method": "dern", "ratio": 0.34}],
    "msmoe-heapr": [{"method": "msmoe", "ratio": 0.25}, {"method": "heapr", "ratio": 0.5}],
}



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    write_words(root / "web.txt", n=1500)
    return root


def calib(root, **kw) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=4, seq_len=32, **kw)


@pytest.fixture(scope="module")
def source(root):
    """family -> (checkpoint folder, routed statistics with probes), built once per family."""
    cache = {}

    def get(family):
        if family not in cache:
            src = save_tiny(family, root / family, seed=3, with_tokenizer=True)
            cache[family] = (src, calibrate(src, calib(root)))
        return cache[family]

    return get


def single_chain(case: str, src, stats, root) -> list:
    if case == "reap":
        return [(EXPERTS, build_plan(stats, "reap", 0.25))]
    if case == "heapr":
        return [(NEURONS, api.make_plan(src, "heapr", 0.5, calib=calib(root)))]
    if case == "camera_layer":
        plan = api.make_plan(src, "camera", 0.5, calib=calib(root), budget="layer")
        assert plan.uniform_width is None  # precondition: a non-uniform plan
        return [(NEURONS, plan)]
    method, _, router = case.partition("_")
    return [(MERGE, make_merge_plan(stats, method, 0.25, router=router or "dominant"))]


def _disk(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if not f.name.startswith("moeprune_"):
            out.update(load_file(f))
    return out


def assert_same_export(mem, lay, mode="layered"):
    """`lay` (layer by layer) holds what `mem` (in memory) holds: on disk, in config.json, reloaded, in logits."""
    a, b = _disk(mem), _disk(lay)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (mem, lay))
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb
    report = json.loads((lay / "moeprune_report.json").read_text())
    assert report["apply_mode"] == mode
    # stock from_pretrained (moeprune's loader for non-uniform widths, which stock transformers refuses by design)
    ma, mb = load_model(mem, dtype="float32"), load_model(lay, dtype="float32")
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    inputs = seeded_inputs(96, 2, 16, seed=5)
    la, lb = logits_of(ma, inputs), logits_of(mb, inputs)
    assert la.abs().max() > 0 and torch.equal(la, lb)


@pytest.mark.parametrize("case", SINGLE)
@pytest.mark.parametrize("family", FAMILIES)
def test_layered_export_equals_in_memory(source, root, tmp_path, family, case):
    src, stats = source(family)
    chain = single_chain(case, src, stats, root)
    mem = apply(src, chain, tmp_path / "mem").out
    lay = apply(src, chain, tmp_path / "lay", lazy=True, max_shard_size="30KB").out
    assert len(list(lay.glob("model-*.safetensors"))) > 1  # re-packed to the shard size, with an index
    assert (lay / "model.safetensors.index.json").is_file()
    # a model that does not fit: expert removal alone is edited on the shards (byte copies), the rest layer by layer
    assert_same_export(mem, lay, "streaming" if case == "reap" else "layered")
    if case == "camera_layer":  # per-layer widths (padded to multiples of 8: on tiny experts, maybe no smaller)
        assert is_nonuniform(json.loads((lay / "config.json").read_text()))
    else:
        assert Checkpoint.open(lay).total_bytes < Checkpoint.open(src).total_bytes  # something was removed


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_layered_recipe_equals_in_memory(source, root, tmp_path, family, recipe):
    src, _ = source(family)
    mem = prune(src, tmp_path / "mem", RECIPES[recipe], calib=calib(root), run_verify=False)[0].out
    lay = apply(src, mem, tmp_path / "lay", lazy=True).out  # the in-memory export's plans, replayed layer by layer
    assert_same_export(mem, lay)


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_stage2_calibration_equals_in_memory_replay(source, root, tmp_path, family):
    src, stats = source(family)
    ckpt = Checkpoint.open(src)
    previous = [(MERGE, make_merge_plan(stats, "dern", 0.25))]
    adapters = chain_adapters(previous, get_adapter(ckpt.config, weight_keys=ckpt.names()))
    sets = prepare(src, calib(root))[2]
    eager = StageContext(ckpt, adapters[1], previous, calib(root), sets)
    lazy = StageContext(ckpt, adapters[1], previous, calib(root, lazy=True), sets, lazy=True)
    want, got = eager.routed_stats(), lazy.routed_stats()
    assert got.num_experts == want.num_experts == adapters[1].num_experts < 8
    want.save(tmp_path / "want.safetensors"), got.save(tmp_path / "got.safetensors")
    a, b = load_file(tmp_path / "want.safetensors"), load_file(tmp_path / "got.safetensors")
    assert sorted(a) == sorted(b) and any(t.abs().sum() > 0 for t in a.values())
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-6, atol=1e-9), name
    # data-free criteria after an earlier stage: per-layer summaries of the lazily replayed model
    wa, wb = eager.weights_source(), lazy.weights_source()
    assert sorted(wa.summaries) == sorted(wb.summaries) == adapters[1].moe_layers()
    for layer, s in wa.summaries.items():
        for f in dataclasses.fields(s):
            assert torch.equal(getattr(s, f.name), getattr(wb.summaries[layer], f.name)), (layer, f.name)
    assert build_plan(wa, "weight_norm", 0.34).kept_experts == build_plan(wb, "weight_norm", 0.34).kept_experts


def test_lazy_layer_is_read_again_after_surgery(source):
    src, stats = source("deepseek_v3")
    plan = make_merge_plan(stats, "dern", 0.25)
    lazy = load_lazy(src, dtype="float32")
    adapter = get_adapter(lazy.model.config, model=lazy.model)
    layer = adapter.moe_layers()[0]
    with lazy.layer(layer) as module:
        before = {k: v.clone() for k, v in module.state_dict().items()}
        MERGE.apply_layer(lazy.model, adapter, plan, layer)
        assert adapter.experts(adapter.block(lazy.model, layer)).gate_up_proj.shape[0] == 6
    with lazy.layer(layer) as module:
        again = module.state_dict()
        assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before)
    assert all(t.is_meta for t in lazy.layers[layer].state_dict().values())


def test_streaming_with_a_merge_is_written_layer_by_layer(source, tmp_path):
    src, stats = source("qwen3_moe")
    chain = [(MERGE, make_merge_plan(stats, "msmoe", 0.25))]
    mem = apply(src, chain, tmp_path / "mem").out
    lay = apply(src, chain, tmp_path / "lay", streaming=True).out
    assert_same_export(mem, lay)


def test_quantized_source_config_is_written_unquantized(source, tmp_path):
    src, _ = source("qwen3_moe")
    config = Checkpoint.open(src).config
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    adapter = get_adapter(config)
    method = _write_config(Checkpoint.open(src), adapter, tmp_path, {"version": "x"}, torch.bfloat16)
    written = json.loads((tmp_path / "config.json").read_text())
    assert method == "fp8" and "quantization_config" not in written
    assert written["moeprune"] == {"version": "x"} and written["dtype"] == "bfloat16"
    assert config.quantization_config["quant_method"] == "fp8"  # the adapter's config is left as it was


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "qwen3_vl_moe"])
def test_lazy_prune_equals_in_memory_prune(source, root, tmp_path, family):
    """`prune(lazy=True)`: every stage calibrated lazily (stage 2 on stage 1 applied layer by layer), exported layer
    by layer, verified; the same plans and tensors as the in-memory run."""
    src, _ = source(family)
    recipe = [{"method": "reap", "ratio": 0.25}, {"method": "hcsmoe", "ratio": 0.34}]
    mem = prune(src, tmp_path / "mem", recipe, calib=calib(root), run_verify=False)[0].out
    applied, result = prune(src, tmp_path / "lay", recipe, calib=calib(root), lazy=True)
    assert result.passed
    for f in sorted((mem / "moeprune_plans").glob("*.json")):
        assert json.loads(f.read_text()) == json.loads((applied.out / "moeprune_plans" / f.name).read_text()), f.name
    assert_same_export(mem, applied.out)


def test_bf16_sharded_source(root, tmp_path):
    """bf16 bytes through the spill files, a sharded source, and the non-layer tensors copied byte for byte."""
    src = save_tiny("deepseek_v3", tmp_path / "src", seed=4, dtype=torch.bfloat16, max_shard_size="60KB",
                    with_tokenizer=True)
    assert len(Checkpoint.open(src).files) > 1  # precondition: sharded
    stats = calibrate(src, calib(root, dtype="float32"))
    chain = [(MERGE, make_merge_plan(stats, "submoe", 0.25))]
    mem = apply(src, chain, tmp_path / "mem").out
    lay = apply(src, chain, tmp_path / "lay", lazy=True, max_shard_size="50KB").out
    a, b = _disk(mem), _disk(lay)
    assert sorted(a) == sorted(b) and {t.dtype for t in b.values()} >= {torch.bfloat16}
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    original = _disk(src)
    assert torch.equal(b["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_layered_refuses_a_bad_plan_before_work(source, tmp_path, monkeypatch):
    """A uniform neuron plan whose width the experts kernel cannot run is refused before anything is read or written."""
    from moeprune.io import layered_export
    from moeprune.select.neuron_plan import NeuronPlan

    src, _ = source("qwen3_moe")
    plan = NeuronPlan({layer: {j: list(range(12)) for j in range(8)} for layer in (1, 2)}, 16)
    monkeypatch.setattr(layered_export, "export_layered", lambda *a, **k: pytest.fail("export ran"))
    with pytest.raises(MoePruneError, match="kept width 12 is not a multiple of 8"):
        apply(src, [(NEURONS, plan)], tmp_path / "out", lazy=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_lazy_neuron_recipe_equals_in_memory(source, root, tmp_path, family):
    """`prune(lazy=True)` with neuron stages (HEAPr after expert removal: the gradients are backpropagated one
    decoder layer at a time over stage 1 applied layer by layer): the in-memory run's plans and tensors, and the
    calibration-split perplexities computed layer by layer equal the whole-model ones."""
    src, _ = source(family)
    recipe = [{"method": "reap", "ratio": 0.25}, {"method": "heapr", "ratio": 0.5}]
    opts = calib(root, held_out=2)
    mem = prune(src, tmp_path / "mem", recipe, calib=opts, lazy=False, run_verify=False)[0]
    lay, result = prune(src, tmp_path / "lay", recipe, calib=opts, lazy=True)
    assert result.passed and result.layer_max_abs_diff  # verified layer by layer
    for f in sorted((mem.out / "moeprune_plans").glob("*.json")):
        assert json.loads(f.read_text()) == json.loads((lay.out / "moeprune_plans" / f.name).read_text()), f.name
    assert_same_export(mem.out, lay.out)
    want, got = mem.report["calibration_split"]["sets"], lay.report["calibration_split"]["sets"]
    assert want and want.keys() == got.keys()
    for name in want:
        for key in ("perplexity_before", "perplexity_after"):
            assert got[name][key] == pytest.approx(want[name][key], rel=1e-5), (name, key)
        assert got[name]["tokens"] == want[name]["tokens"]

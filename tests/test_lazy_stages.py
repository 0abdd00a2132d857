"""Stages that used to refuse `--lazy`, now layer by layer: wanda (unstructured, OWL, 2:4), MC-SMoE's compress, and
routing policies fitted on calibration text (top_p / naee_skip with target_active).

The reference is the in-memory run of the same recipe (whole model loaded, `apply_chain`, `save_pretrained`): the
lazy run must write the same plans (JSON and tensors, byte for byte through safetensors' own reader), the same
export tensors and config, and pass layer-by-layer verification. The plan store (`stages/weights_store.py`) is
checked against safetensors' `load_file` of the file it saves and against the dict it was given. Routing: the router
weights captured one decoder layer at a time are those of the whole-model forward, so the thresholds, the export and
its verification equal the in-memory run's; otp (trained through whole-model forwards) is refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoePruneError
from moeprune.pipeline.run import prune
from moeprune.stages.weights_plan import WeightsPlan
from moeprune.stages.weights_store import FileLayers, SpilledLayers, layer_sink
from moeprune.tiny import save_tiny
from refusal import assert_refused
from test_layered import assert_same_export, calib
from textgen import write_words

RECIPES = {
    "wanda-owl": [{"method": "reap", "ratio": 0.25}, {"method": "wanda", "sparsity": 0.6, "owl": True}],
    "wanda-2:4": [{"method": "wanda", "pattern": "2:4"}],
    "msmoe-compress": [{"method": "msmoe", "ratio": 0.25}, {"method": "compress", "rank": 3, "sparsity": 0.8,
                                                            "experts": "all"}],
}
ROUTING = {
    "top_p": [{"method": "top_p", "target_active": 1.5}],
    "naee_skip": [{"method": "reap", "ratio": 0.25}, {"method": "naee_skip", "target_active": 1.4,
                                                       "scope": "global"}],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy_stages")
    write_words(root / "web.txt", n=1500)
    return root


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_lazy_weights_stage_equals_in_memory(root, tmp_path, family, recipe):
    src = save_tiny(family, tmp_path / "src", seed=3, with_tokenizer=True)
    mem = prune(src, tmp_path / "mem", RECIPES[recipe], calib=calib(root), lazy=False, run_verify=False)[0].out
    lay, result = prune(src, tmp_path / "lay", RECIPES[recipe], calib=calib(root), lazy=True)
    assert result.passed and result.layer_max_abs_diff  # verified layer by layer
    plans = sorted((mem / "moeprune_plans").glob("*"))
    assert any(f.name.endswith(".tensors.safetensors") for f in plans)  # precondition: a weights plan
    for f in plans:
        other = lay.out / "moeprune_plans" / f.name
        if f.suffix == ".json":
            assert json.loads(f.read_text()) == json.loads(other.read_text()), f.name
        else:
            a, b = load_file(f), load_file(other)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert_same_export(mem, lay.out)


def _plan(experts, router=None) -> WeightsPlan:
    return WeightsPlan("wanda", 4, 6, experts, router or {})


def test_streamed_layer_reads_back_and_a_failed_one_leaves_nothing(tmp_path):
    """`layer_sink` into a store streams each tensor to disk (`SpilledLayers.writer`); into a dict it gathers them.
    Both read back the tensors put (the reference: the tensors themselves); a layer whose block raises is absent
    and its partial file is gone."""
    g = torch.Generator().manual_seed(1)
    want = {i: {"gate": torch.randn(6, 5, generator=g).to(torch.bfloat16), "down": torch.randn(5, 6, generator=g)}
            for i in (0, 2)}
    for store in (SpilledLayers(tmp_path), {}):
        with layer_sink(store, 4) as put:
            for i, roles in want.items():
                for role, t in roles.items():
                    put(i, role, t)
        got = store[4]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[i][r], t) and got[i][r].dtype == t.dtype for i in want for r, t in want[i].items())
    spilled = SpilledLayers(tmp_path)
    with pytest.raises(RuntimeError, match="stop"), layer_sink(spilled, 5) as put:
        put(0, "gate", want[0]["gate"])
        raise RuntimeError("stop")
    assert 5 not in spilled and not any(p.is_file() for p in Path(spilled._dir.name).rglob("*"))


def test_store_saves_and_reads_back_one_layer_at_a_time(tmp_path):
    g = torch.Generator().manual_seed(0)
    dicts = {layer: {i: {"gate": torch.randn(6, 5, generator=g).to(torch.bfloat16), "down": torch.randn(5, 6,
                                                                                                       generator=g)}
                     for i in (0, 3)} for layer in (1, 2, 10)}
    router = {2: {"weight": torch.randn(4, 5, generator=g)}}
    spilled = SpilledLayers(tmp_path)
    for layer, ex in dicts.items():
        spilled[layer] = ex
    assert spilled.index(10) == {0: ["down", "gate"], 3: ["down", "gate"]} and 7 not in spilled
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = _plan(dicts, router).save(tmp_path / "a" / "1-wanda.json")
    b = _plan(spilled, router).save(tmp_path / "b" / "1-wanda.json")
    for path in (a, b):  # safetensors' own reader sees every tensor, name and dtype of the dict
        flat = load_file(path.with_name("1-wanda.tensors.safetensors"))
        want = {f"layer.{layer}.expert.{i}.{r}": t for layer, ex in dicts.items() for i, roles in ex.items()
                for r, t in roles.items()} | {"layer.2.router.weight": router[2]["weight"]}
        assert flat.keys() == want.keys()
        assert all(flat[k].dtype == want[k].dtype and torch.equal(flat[k], want[k]) for k in want)
    assert json.loads(a.read_text())["tensors_sha256"] == json.loads(b.read_text())["tensors_sha256"]
    loaded = WeightsPlan.load(b)
    assert isinstance(loaded.experts, FileLayers) and loaded.layers == [1, 2, 10]
    assert all(torch.equal(loaded.experts[2][i][r], dicts[2][i][r]) for i in (0, 3) for r in ("gate", "down"))
    assert torch.equal(loaded.router[2]["weight"], router[2]["weight"])


def test_store_refuses_a_changed_tensors_file(tmp_path):
    path = _plan({1: {0: {"up": torch.ones(6, 5)}}}).save(tmp_path / "1-wanda.json")
    tensors = path.with_name("1-wanda.tensors.safetensors")
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 0x40  # one bit of the last weight
    tensors.write_bytes(bytes(raw))
    with pytest.raises(MoePruneError, match="do not match the sha256"):
        WeightsPlan.load(path)


def test_layered_verify_fails_an_export_whose_zeros_were_undone(root, tmp_path):
    """The lazy wanda export with one expert's masked weights put back to the original's: `verify --lazy` exits 1
    (the reference is the original with the plan's zeros, not the original itself), the untouched export exits 0."""
    from moeprune.cli import main

    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, with_tokenizer=True)
    out = prune(src, tmp_path / "lay", [{"method": "wanda", "sparsity": 0.5}], calib=calib(root), lazy=True,
                run_verify=False)[0].out
    original = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    shard = next(f for f in sorted(out.glob("model*.safetensors")))
    tensors = load_file(shard)
    key = next(k for k in sorted(tensors) if "layers.1." in k and "experts" in k and tensors[k].dim() >= 2)
    assert not torch.equal(tensors[key][0], original[key][0])  # precondition: wanda zeroed some of it
    assert main(["verify", str(src), str(out), "--lazy"]) == 0
    tensors[key][0] = original[key][0]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert main(["verify", str(src), str(out), "--lazy"]) == 1


@pytest.mark.parametrize("recipe", list(ROUTING))
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss"])
def test_lazy_routing_fit_equals_in_memory(root, tmp_path, family, recipe):
    """Also the verification of a policy after expert removal on group-limited sigmoid routers (deepseek_v3,
    glm4_moe), whose reference (removed experts masked) once filled top-k slots with removed experts
    (models/dynamic.py)."""
    src = save_tiny(family, tmp_path / "src", seed=3, with_tokenizer=True)
    opts = calib(root)
    mem = prune(src, tmp_path / "mem", ROUTING[recipe], calib=opts, lazy=False, run_verify=False)[0].out
    lay, result = prune(src, tmp_path / "lay", ROUTING[recipe], calib=opts, lazy=True)
    assert result.passed and result.layer_max_abs_diff  # verified layer by layer
    n = len(ROUTING[recipe])
    want = json.loads((mem / "moeprune_plans" / f"{n}-routing.json").read_text())
    got = json.loads((lay.out / "moeprune_plans" / f"{n}-routing.json").read_text())
    assert want["thresholds"] and got == want
    assert_same_export(mem, lay.out)


def test_lazy_otp_is_refused_before_work(root, tmp_path, no_work):
    src = save_tiny("qwen3_moe", tmp_path / "src", seed=3, with_tokenizer=True)
    assert_refused(lambda: prune(src, tmp_path / "out", [{"method": "otp", "target_active": 1.5}], calib=calib(root),
                                 lazy=True), r"otp trains its selectors on the whole model.*drop --lazy",
                   inputs=[src], out=tmp_path / "out")


def test_a_loaded_plan_saved_over_its_own_file_still_reads(tmp_path):
    """A plan file as older releases wrote it (safetensors' own layout: wider dtypes first), read, then saved back
    onto that file (name order): the loaded plan still reads the right bytes, and so does a fresh load."""
    g = torch.Generator().manual_seed(1)
    want = {1: {0: {"down": torch.randn(5, 6, generator=g).half(), "gate": torch.randn(6, 5, generator=g)}}}
    path = _plan(want).save(tmp_path / "1-wanda.json")
    tensors = path.with_name("1-wanda.tensors.safetensors")
    save_file({f"layer.1.expert.0.{r}": t for r, t in want[1][0].items()}, str(tensors))  # the old layout
    plan = WeightsPlan.load(path)
    plan.save(path)
    again = WeightsPlan.load(path)
    for p in (plan, again):
        assert all(torch.equal(p.experts[1][0][r], want[1][0][r]) for r in ("down", "gate"))

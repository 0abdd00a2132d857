"""The command line end to end on a tiny Qwen3-MoE checkpoint (3 layers, layer 0 dense, E=8, top-2):
info (table and JSON, against a brute-force count of the expert tensors), plan, apply + verify (PASS with the
right plan, FAIL with another), prune --streaming (loads with stock transformers), and refusing to overwrite."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moeprune.cli import main
from moeprune.tiny import save_tiny

EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def model(root) -> Path:
    return save_tiny("qwen3_moe", root / "qwen3_moe", seed=3)


@pytest.fixture(scope="module")
def tensors(model) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read with the safetensors library (independently of moeprune)."""
    shapes = {}
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


@pytest.fixture(scope="module")
def moe_layers(tensors) -> list[int]:
    layers = sorted({int(m.group(1)) for k in tensors if (m := EXPERT_KEY.match(k))})
    assert layers == [1, 2]  # the tiny config: mlp_only_layers=[0]
    return layers


@pytest.fixture(scope="module")
def aimer_plan(root, model) -> Path:
    path = root / "aimer_plan.json"
    assert main(["plan", str(model), "--method", "aimer", "--ratio", "0.25", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def applied(root, model, aimer_plan) -> tuple[int, Path]:
    out = root / "pruned_aimer"
    rc = main(["apply", str(model), "--plan", str(aimer_plan), "--out", str(out)])
    return rc, out


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------------------- info


def test_info_table(model, capsys):
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^family\s+qwen3_moe \(model_type qwen3_moe\)$", out, re.M), out
    assert re.search(r"3 decoder layers, 2 MoE: 1-2", out), out
    assert re.search(r"E=8 routed per MoE layer, top-2", out), out
    assert re.search(r"^\s+25%: drop 2/8 per layer, saves .+ \(\d+\.\d% of the checkpoint\)$", out, re.M), out
    assert re.search(r"^\s+50%: drop 4/8 per layer, saves .+ \(\d+\.\d% of the checkpoint\)$", out, re.M), out
    assert re.search(r"^\s+0\s+-\s+-\s+dense", out, re.M), out  # layer 0 is shown as dense


def test_info_json_matches_brute_force(model, tensors, moe_layers, capsys):
    assert main(["info", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    routed = sum(math.prod(s) for k, s in tensors.items() if EXPERT_KEY.match(k))
    total = sum(math.prod(s) for s in tensors.values())
    assert 0 < info["routed_params"] < info["total_params"]
    assert info["routed_params"] == routed
    assert info["total_params"] == total
    assert info["num_experts"] == 8 and info["top_k"] == 2 and info["family"] == "qwen3_moe"
    assert info["moe_layers"] == moe_layers
    per_layer = {
        layer: sum(math.prod(s) for k, s in tensors.items() if (m := EXPERT_KEY.match(k)) and int(m.group(1)) == layer)
        for layer in moe_layers
    }
    assert {int(k): v for k, v in info["per_layer_expert_params"].items()} == per_layer
    # routers: [E, H] per MoE layer
    assert info["params"]["router"] == sum(math.prod(tensors[f"model.layers.{i}.mlp.gate.weight"]) for i in moe_layers)
    for ratio, dropped in (("25%", 2), ("50%", 4)):
        s = info["savings"][ratio]
        assert s["possible"] and s["experts_dropped_per_layer"] == dropped
        assert s["bytes_saved"] == info["routed_bytes"] * dropped // 8
        assert s["bytes_saved"] == routed * 4 * dropped // 8  # float32


# ----------------------------------------------------------------------------------------------- plan


def test_plan_out(aimer_plan, moe_layers):
    plan = json.loads(aimer_plan.read_text())
    assert set(plan["kept_experts"]) == {str(i) for i in moe_layers}
    assert plan["num_experts"] == 8 and plan["method"] == "aimer" and plan["ratio"] == 0.25
    for layer, kept in plan["kept_experts"].items():
        assert len(kept) == 6
        assert kept == sorted(set(kept)) and all(0 <= j < 8 for j in kept)
        # AIMER prunes the highest scores: the two dropped experts are the two highest-scoring ones
        scores = plan["scores"][layer]
        dropped = sorted(set(range(8)) - set(kept))
        assert min(scores[j] for j in dropped) >= max(scores[j] for j in kept)


def test_plan_printed_without_out(model, aimer_plan, capsys):
    assert main(["plan", str(model), "--method", "aimer", "--ratio", "0.25"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "scores" not in printed
    assert printed["kept_experts"] == json.loads(aimer_plan.read_text())["kept_experts"]


# ----------------------------------------------------------------------------------------------- apply + verify


def test_apply_then_verify_passes(model, applied, capsys):
    rc, out = applied
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_experts", cfg.get("num_local_experts")) == 6
    capsys.readouterr()
    assert main(["verify", str(model), str(out)]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"max abs logit difference: .* -> PASS$", stdout.strip()), stdout


def test_verify_with_a_different_plan_fails(root, model, applied, aimer_plan, capsys):
    rc, out = applied
    assert rc == 0
    aimer_kept = json.loads(aimer_plan.read_text())["kept_experts"]
    other = root / "other_plan.json"
    for seed in range(20):
        assert (
            main(
                ["plan", str(model), "--method", "random", "--ratio", "0.25", "--seed", str(seed), "--out", str(other)]
            )
            == 0
        )
        other_kept = json.loads(other.read_text())["kept_experts"]
        if all(other_kept[k] != aimer_kept[k] for k in aimer_kept):
            break
    else:
        pytest.fail("no random plan differing from the aimer plan in every layer")
    capsys.readouterr()
    assert main(["verify", str(model), str(out), "--plan", str(other)]) == 1
    stdout = capsys.readouterr().out
    assert "-> FAIL" in stdout and "PASS" not in stdout, stdout


# ----------------------------------------------------------------------------------------------- prune


def test_prune_streaming_loads_with_stock_transformers(root, model, tensors, moe_layers, capsys):
    from transformers import AutoModelForCausalLM

    out = root / "pruned_streaming"
    assert (
        main(["prune", str(model), "--method", "weight_norm", "--ratio", "0.25", "--streaming", "--out", str(out)]) == 0
    )
    assert "-> PASS" in capsys.readouterr().out
    report = json.loads((out / "moeprune_report.json").read_text())
    assert report["apply_mode"] == "streaming" and report["verify"]["passed"] is True

    pruned = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert pruned.config.num_experts == 6
    sd = pruned.state_dict()
    for layer in moe_layers:
        assert sd[f"model.layers.{layer}.mlp.gate.weight"].shape == (6, 32)
    # kept experts are renumbered in order and copied bit-exactly
    kept = {int(k): v for k, v in report["kept_experts"].items()}
    with (
        safe_open(str(model / "model.safetensors"), "pt") as src,
        safe_open(str(out / "model.safetensors"), "pt") as dst,
    ):
        for layer in moe_layers:
            assert len(kept[layer]) == 6
            for new, old in enumerate(kept[layer]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    a = src.get_tensor(f"model.layers.{layer}.mlp.experts.{old}.{proj}.weight")
                    b = dst.get_tensor(f"model.layers.{layer}.mlp.experts.{new}.{proj}.weight")
                    assert torch.equal(a, b)
            assert not any(k.startswith(f"model.layers.{layer}.mlp.experts.6.") for k in dst.keys())
    with torch.no_grad():
        logits = pruned(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()


def test_prune_twice_without_overwrite(tmp_path, model, capsys):
    out = tmp_path / "out"
    argv = ["prune", str(model), "--method", "aimer", "--ratio", "0.5", "--streaming", "--no-verify", "--out", str(out)]
    assert main(argv) == 0
    first = hashes(out)
    assert "model.safetensors" in first
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and "Traceback" not in err
    assert hashes(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

"""Quantized exports: a stock `from_pretrained` (compressed-tensors installed) of the export gives the logits of the
original with every quantized weight replaced by dequantize(quantize(W)) computed HERE from the formula (RTN) or
from the plan's stored integers and scales (GPTQ); the packed tensors have the sizes the bit widths imply; mixed
per-layer widths reload through compressed-tensors' own decompression; GPTQ's per-expert Hessians come from that
expert's routed tokens only (router run by hand)."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moeprune import api
from moeprune.calibration.run import CalibrateOptions
from moeprune.tiny import save_tiny
from test_quant_math import rtn_reference

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
G = 8  # group size (the tiny models' widths are 16 and 32)
SHARED = ("shared_experts", "attention")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    g = torch.Generator().manual_seed(1)
    (root / "web.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 12, (3000,), generator=g)))
    for family in ("qwen3_moe", "qwen2_moe", "deepseek_v3"):
        save_tiny(family, root / family, seed=5, with_tokenizer=True)
    return root


def calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48, held_out=0)


def quantized_weights(model, parts: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, slice | None, int | None]]:
    """name -> (parameter, rows slice of a fused gate_up, expert index) of every matrix the scheme quantizes, found
    here by module names (independent of moeprune's target list)."""
    out = {}
    for name, p in model.named_parameters():
        m = re.match(r".*layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if m:
            for j in range(p.shape[0]):
                if m.group(2) == "gate_up_proj":
                    half = p.shape[1] // 2
                    out[f"{name}.{j}.gate"] = (p, slice(0, half), j)
                    out[f"{name}.{j}.up"] = (p, slice(half, 2 * half), j)
                else:
                    out[f"{name}.{j}"] = (p, None, j)
        elif "shared_experts" in parts and re.match(r".*mlp\.shared_experts?\.(gate|up|down)_proj\.weight$", name):
            out[name] = (p, None, None)
        elif "attention" in parts and re.match(r".*self_attn\..*proj[^.]*\.weight$", name):
            out[name] = (p, None, None)
    return out


@torch.no_grad()
def fake_quantized_reference(path, bits: int, parts: tuple[str, ...], layer_bits: dict | None = None):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, (p, rows, j) in quantized_weights(model, parts).items():
        w = p[j] if j is not None else p
        w = w[rows] if rows is not None else w
        b = (layer_bits or {}).get(int(re.search(r"layers\.(\d+)\.", name).group(1)), bits) if j is not None else bits
        w.copy_(rtn_reference(w.clone(), b, G)[3])
    return model


@torch.no_grad()
def plan_reference(path, plan_dir):
    """The original with every planned matrix replaced by (q − z)·s read from the plan's tensors (plain torch)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    flat = load_file(str(next(plan_dir.glob("*.tensors.safetensors"))))
    layers = model.model.layers
    for key in {k.rsplit(".", 1)[0] for k in flat}:
        q, s = flat[f"{key}.q"].float(), flat[f"{key}.scale"].float()
        z = flat.get(f"{key}.zero", torch.zeros_like(s)).float()
        w_hat = ((q.reshape(q.shape[0], -1, G) - z[..., None]) * s[..., None]).reshape(q.shape)
        p = key.split(".")
        if p[2] == "expert":
            experts = layers[int(p[1])].mlp.experts
            j, role = int(p[3]), p[4]
            if role == "down":
                experts.down_proj[j].copy_(w_hat)
            else:
                half = experts.gate_up_proj.shape[1] // 2
                experts.gate_up_proj[j][slice(0, half) if role == "gate" else slice(half, 2 * half)].copy_(w_hat)
        else:
            layers[int(p[1])].get_submodule(".".join(p[3:])).weight.copy_(w_hat)
    return model


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


CASES = [("qwen3_moe", "w4a16", "rtn", ()), ("qwen3_moe", "w8a16", "gptq", ()),
         ("qwen2_moe", "w8a16", "rtn", SHARED), ("qwen2_moe", "w4a16", "gptq", SHARED),
         ("deepseek_v3", "w4a16", "rtn", SHARED), ("deepseek_v3", "w8a16", "gptq", ())]


@pytest.mark.parametrize("family,scheme,algorithm,parts", CASES)
def test_stock_reload_equals_fake_quantized_reference(root, family, scheme, algorithm, parts):
    out = root / f"{family}-{scheme}-{algorithm}"
    applied, result = api.quantize(root / family, out, scheme=scheme, algorithm=algorithm, group_size=G,
                                   parts=list(parts), calib=calib(root) if algorithm == "gptq" else None)
    assert result.passed, result
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    bits = int(scheme[1])
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = logits(stock)
    original = logits(AutoModelForCausalLM.from_pretrained(root / family, dtype=torch.float32))
    if algorithm == "rtn":
        want = logits(fake_quantized_reference(root / family, bits, parts))
    else:
        want = logits(plan_reference(root / family, out / "moeprune_plans"))
        rtn = logits(fake_quantized_reference(root / family, bits, parts))
        assert not torch.allclose(want, rtn, atol=1e-5)  # GPTQ changed something RTN would not
        report = json.loads((out / "moeprune_report.json").read_text())
        assert sum(len(v) for v in report["rtn_fallbacks"].values()) < 2 * 8  # most experts had their tokens
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert not torch.allclose(got, original, atol=1e-4)  # quantization did change the model


def test_packed_tensors_have_the_expected_bytes(root):
    out = root / "qwen2_moe-w4a16-bytes"
    api.quantize(root / "qwen2_moe", out, scheme="w4a16", group_size=G, parts=["attention"], run_verify=False)
    src = {}
    with safe_open(str(root / "qwen2_moe" / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118
            src[k] = f.get_slice(k)
    quantized = [k for k in src if re.search(r"(mlp\.experts\.\d+\.(gate|up|down)_proj|self_attn\.[qkvo]_proj)"
                                            r"\.weight$", k)]
    assert len(quantized) == 2 * (8 * 3 + 4)
    expected = sum(math.prod(s.get_shape()) * 4 for k, s in src.items() if k not in quantized)  # float32 rest
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for k in quantized:
            prefix = k.removesuffix(".weight")
            rows, cols = src[k].get_shape()
            packed, scale, shape = (f.get_slice(f"{prefix}.{n}") for n in ("weight_packed", "weight_scale",
                                                                             "weight_shape"))
            assert packed.get_dtype() == "I32" and packed.get_shape() == [rows, math.ceil(cols * 4 / 32)]
            assert scale.get_dtype() == "F32" and scale.get_shape() == [rows, cols // G]
            assert shape.get_shape() == [2] and k not in names
            expected += rows * math.ceil(cols * 4 / 32) * 4 + rows * (cols // G) * 4 + 2 * 8
        assert not any(n.endswith("weight_zero_point") for n in names)  # symmetric
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        size = {"I32": 4, "F32": 4, "I64": 8}
        total = sum(math.prod(f.get_slice(n).get_shape()) * size[f.get_slice(n).get_dtype()] for n in f.keys())  # noqa: SIM118
    assert total == expected
    report = json.loads((out / "moeprune_report.json").read_text())
    assert report["weight_bytes_after"] == expected < report["weight_bytes_before"]


def test_mixed_widths_reload_through_compressed_tensors(root):
    """Per-layer widths (layer 1 at 8 bits, layer 2 at 4) and one layer with per-expert widths: moeprune's loader
    (compressed-tensors' decompression, module by module) gives the reference; each packed module also decompresses,
    by compressed-tensors' compressor with the group whose regex matches it here, to the reference weight."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from moeprune.io.load import load_model

    out = root / "deepseek-mixed"
    _, result = api.quantize(root / "deepseek_v3", out, scheme="w4a16", group_size=G, bits={1: 8, 2: 4})
    assert result.passed
    want_model = fake_quantized_reference(root / "deepseek_v3", 4, (), layer_bits={1: 8, 2: 4})
    got = logits(load_model(out, dtype="float32"))
    assert torch.allclose(got, logits(want_model), atol=1e-5, rtol=0)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "quant_method"}).config_groups
    assert {g.weights.num_bits for g in groups.values()} == {4, 8}
    tensors = load_file(str(out / "model.safetensors"))
    ref = dict(want_model.named_parameters())
    for layer, j, bits in ((1, 3, 8), (2, 5, 4)):
        prefix = f"model.layers.{layer}.mlp.experts.{j}.down_proj"
        group = [g for g in groups.values() if any(re.match(t.removeprefix("re:"), prefix) for t in g.targets)]
        assert len(group) == 1 and group[0].weights.num_bits == bits
        state = {n: tensors[f"{prefix}.{n}"] for n in ("weight_packed", "weight_scale", "weight_shape")}
        w = BaseCompressor.get_value_from_registry("pack-quantized").decompress(state, group[0])["weight"]
        assert torch.equal(w, ref[f"model.layers.{layer}.mlp.experts.down_proj"][j])
    # what stock transformers 5.24 does with it: every expert decoded with the first expert group's width
    stock = dict(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).named_parameters())
    first = next(g for g in groups.values() if any("experts" in t for t in g.targets)).weights.num_bits
    other = 1 if first == 4 else 2
    if torch.equal(stock[f"model.layers.{other}.mlp.experts.down_proj"],
                   ref[f"model.layers.{other}.mlp.experts.down_proj"]):
        warnings.warn("this transformers decodes mixed expert widths correctly now: update docs/quantization.md",
                      stacklevel=1)  # the checks above (moeprune's loader, each packed module) stand either way


def test_per_expert_widths_inside_a_layer_are_exported(root):
    out = root / "qwen3-per-expert"
    _, result = api.quantize(root / "qwen3_moe", out, scheme="w4a16", group_size=G, bits={2: {0: 8, 3: 2}})
    assert result.passed
    report = json.loads((out / "moeprune_report.json").read_text())
    assert report["expert_bits"]["2"]["0"] == 8 and report["expert_bits"]["2"]["3"] == 2
    assert report["layer_bits"] == {"1": 4, "2": None} and not report["loadable_by_stock_config"]


def test_gptq_hessian_uses_only_the_experts_routed_tokens(root):
    """H_in[j] of layer 1 against 2 Σ x xᵀ over the tokens the router (run here by hand: softmax, top-k) sends to j."""
    from moeprune.calibration.run import prepare
    from moeprune.calibration.session import make_batches
    from moeprune.io.load import load_model
    from moeprune.models import get_adapter
    from moeprune.quant.hessian import layer_hessians
    from moeprune.repair.capture import layer_output

    path = root / "qwen3_moe"
    sets = prepare(path, calib(root))[2]
    model = load_model(path, dtype="float32")
    adapter = get_adapter(model.config, model=model)
    batches = make_batches(model, adapter, sets, 4, "cpu")
    for b in batches:  # to layer 1's input
        b.hidden = layer_output(adapter.decoder_layers(model)[0], b, 0, "cpu", carry=True)
    layer = adapter.decoder_layers(model)[1]
    hess = layer_hessians(layer, adapter.block(model, 1), adapter, batches, 1, "cpu", [])

    seen = []
    handle = layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for s in sets:
            model(input_ids=s.input_ids, attention_mask=s.attention_mask)
    handle.remove()
    x = torch.cat([h.reshape(-1, h.shape[-1])[s.attention_mask.reshape(-1).bool()] for h, s in zip(seen, sets,
                                                                                                  strict=True)])
    probs = torch.softmax(x.double() @ layer.mlp.gate.weight.double().T, dim=-1)  # [T, E]
    top = probs.topk(model.config.num_experts_per_tok, dim=-1).indices  # [T, k]
    counts = []
    for j in range(8):
        xj = x[(top == j).any(-1)].double()
        counts.append(xj.shape[0])
        if xj.shape[0] == 0:
            assert j not in hess.expert_in
            continue
        assert hess.tokens[j] == xj.shape[0]
        assert torch.allclose(hess.expert_in[j], 2 * xj.T @ xj, rtol=1e-4, atol=1e-6)
    assert sum(counts) == 2 * x.shape[0] and max(counts) < x.shape[0]  # top-2: every token twice, split up


def test_layer_by_layer_gptq_equals_in_memory(root):
    """--lazy: GPTQ on one decoder layer at a time and the layered export give the same checkpoint bytes."""
    outs = []
    for lazy in (False, True):
        out = root / f"qwen3-gptq-lazy{lazy}"
        applied, result = api.quantize(root / "qwen3_moe", out, scheme="w4a16", algorithm="gptq", group_size=G,
                                       calib=calib(root), lazy=lazy)
        assert result.passed and applied.report["apply_mode"] == ("layered" if lazy else "in-memory")
        outs.append(load_file(str(out / "model.safetensors")))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_quantizing_an_export_ignores_its_statistics_side_file(root):
    """An export carries its calibration statistics (moeprune_stats.safetensors, float64) next to the weights: they
    are not weights. Checkpoint.open used to list them, so the quantize stage took float64 (the statistics' many
    tensors) as the stored dtype and wrote float64 scales for a float32 model, and the sizes counted them."""
    from moeprune.io.checkpoint import STATS_NAME, Checkpoint

    pruned = root / "qwen3_moe-pruned"
    api.prune(root / "qwen3_moe", pruned, method="frequency", ratio=0.25, calib=calib(root), run_verify=False)
    assert (pruned / STATS_NAME).is_file()
    ckpt = Checkpoint.open(pruned)
    assert [f.name for f in ckpt.files] == ["model.safetensors"]
    with safe_open(str(pruned / "model.safetensors"), "pt") as f:
        weights = sum(math.prod(f.get_slice(n).get_shape()) * 4 for n in f.keys())  # noqa: SIM118  (all float32)
    assert ckpt.total_bytes == weights
    out = root / "qwen3_moe-pruned-w4a16"
    api.quantize(pruned, out, scheme="w4a16", group_size=G, run_verify=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        scales = {f.get_slice(n).get_dtype() for n in f.keys() if n.endswith("weight_scale")}  # noqa: SIM118
    assert scales == {"F32"}

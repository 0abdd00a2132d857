"""Quantized checkpoints (FP8 block-quantized DeepSeek-V3 / Qwen3-MoE, MXFP4 gpt-oss): lazy loading dequantizes them
exactly as transformers' `from_pretrained(..., quantization_config=<Format>Config(dequantize=True))` does, routed
statistics match the dequantized in-memory model, and streaming expert removal keeps the format bit for bit.
Refusals of broken scales and unknown formats: `test_quantized_refusals.py`. The checkpoints and references:
`quantized_ckpt.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moeprune.calibration.data import CalibSet
from moeprune.calibration.session import collect
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.lazy import load_lazy
from moeprune.io.stock import auto_class
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import seeded_inputs
from moeprune.select.plan import PrunePlan
from moeprune.surgery import streaming
from quantized_ckpt import CASES, DROPPED, E2M1, bits, load_dequantized, mxfp4_pack, quantized_checkpoint, tensors_of


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantized")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, root) -> tuple[str, str, Path]:
    family, fmt, overrides = CASES[request.param]
    return family, fmt, quantized_checkpoint(family, fmt, root / request.param, **overrides)


# ----------------------------------------------------------------------------------------------- the formats


def test_mxfp4_packing_round_trips_through_transformers():
    """Exactly representable weights come back bit for bit through transformers' `convert_moe_packed_tensors`
    (the unpacking `Mxfp4Dequantize` runs); others within half an e2m1 step (<= one scale unit)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    E, n_in, n_out = 3, 64, 8
    values = torch.tensor(E2M1)[torch.randint(0, 16, (E, n_out, n_in), generator=g)]  # [E, out, in]
    values[..., ::32] = 6.0  # every block's max |v| is 6: its scale is exactly 2**exp
    exp = torch.randint(-4, 3, (E, n_out, n_in // 32), generator=g).float()  # [E, out, G]
    exact = (values.reshape(E, n_out, n_in // 32, 32) * torch.exp2(exp)[..., None]).reshape(E, n_out, n_in)
    w = exact.transpose(1, 2)  # [E, in, out], gpt-oss's in-memory orientation
    blocks, scales = mxfp4_pack(w)
    assert blocks.shape == (E, n_out, n_in // 32, 16) and scales.shape == (E, n_out, n_in // 32)
    assert torch.equal(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), w)
    noisy = torch.randn(E, n_in, n_out, generator=g)
    blocks, scales = mxfp4_pack(noisy)
    back = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    unit = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1).transpose(1, 2)  # [E, in, out]
    assert ((back - noisy).abs() <= unit).all()
    assert (back - noisy).abs().max() > 0 and back.abs().max() > 0


def test_checkpoints_are_really_quantized(case):
    family, fmt, path = case
    on_disk = tensors_of(path)
    if fmt == "fp8":
        experts = [k for k in on_disk if re.search(r"\.experts\.\d+\.\w+\.weight$", k)]
        assert experts and all(on_disk[k].dtype == torch.float8_e4m3fn for k in experts)
        assert all(on_disk[k + "_scale_inv"].dtype == torch.float32 for k in experts)
        assert on_disk["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # routers unquantized
    else:
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in on_disk)
        assert on_disk["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == torch.uint8
    assert Checkpoint.open(path).quantization.method == fmt


def test_info_counts_parameters_not_stored_elements(case):
    """`moeprune info` on a quantized checkpoint: the same parameter counts as its bf16 source (scales are no
    parameters, an MXFP4 byte holds two), fewer bytes."""
    from moeprune.models.summary import summarize

    family, fmt, path = case
    quantized, source = summarize(str(path)), summarize(str(path.parent / f"{path.name}-bf16"))
    assert quantized.params == source.params and quantized.per_layer_expert_params == source.per_layer_expert_params
    assert quantized.routed_bytes < 0.6 * source.routed_bytes and quantized.routed_params > 0


def test_data_free_weight_summaries_read_dequantized_weights(case):
    """Data-free criteria summarise expert weights straight from the shards: on a quantized checkpoint they must
    see the dequantized weights, as transformers' dequantized model holds them (tolerance: bf16 rounding of the
    model's copy, rtol 1e-2; element counts exact)."""
    from moeprune.criteria.weights import summarize_checkpoint, summarize_model

    family, fmt, path = case
    ckpt = Checkpoint.open(path)
    got = summarize_checkpoint(ckpt, get_adapter(ckpt.config, weight_keys=ckpt.names()))
    model = load_dequantized(path, torch.float32)
    want = summarize_model(model, get_adapter(model.config, model=model))
    assert got.keys() == want.keys() and got
    for layer, w in want.items():
        assert torch.equal(got[layer].numel, w.numel), layer
        torch.testing.assert_close(got[layer].abs_sum, w.abs_sum, rtol=1e-2, atol=0)
        torch.testing.assert_close(got[layer].sq_sum, w.sq_sum, rtol=1e-2, atol=0)
        assert w.abs_sum.min() > 0


# ----------------------------------------------------------------------------------------------- lazy loading


def test_lazy_layers_equal_transformers_dequantized(case):
    """Every materialised layer and every module around them equals from_pretrained(dequantize=True) bit for
    bit; the model is the plain one (no quantized modules, no quantization_config) and close to the bf16 source."""
    family, fmt, path = case
    ref, lazy = load_dequantized(path), load_lazy(path)
    assert getattr(lazy.model.config, "quantization_config", None) is None
    # each layer's group holds that layer's keys, its scales / blocks included; nothing but the head is left out
    names = Checkpoint.open(path).names()
    for i in range(len(lazy.layers)):
        assert all(k.startswith(f"model.layers.{i}.") for k in lazy.keys[i])
        assert any(k.endswith(("_scale_inv", "_scales")) for k in lazy.keys[i])
    assert sorted(k for group in lazy.keys.values() for k in group) == sorted(k for k in names if "lm_head" not in k)
    prefix = lazy.layer_prefix + "."
    rest = {n: t for n, t in list(lazy.model.named_parameters()) + list(lazy.model.named_buffers())
            if not n.startswith((prefix, "lm_head."))}
    want = dict(list(ref.named_parameters()) + list(ref.named_buffers()))
    assert rest and all(torch.equal(t, want[n]) and t.dtype == want[n].dtype for n, t in rest.items())
    source = auto_class(ref.config).from_pretrained(str(path.parent / f"{path.name}-bf16"), dtype=torch.bfloat16)
    adapter = get_adapter(ref.config, model=ref)
    ref_layers, src_layers = adapter.decoder_layers(ref), adapter.decoder_layers(source)
    for i in range(len(lazy.layers)):
        with lazy.layer(i) as layer:
            got, exp = layer.state_dict(), ref_layers[i].state_dict()
            assert got.keys() == exp.keys()
            for k, t in got.items():
                assert t.dtype == exp[k].dtype and torch.equal(t, exp[k]), (family, i, k)
            assert got["self_attn.o_proj.weight"].dtype == torch.bfloat16  # dequantized to the model's dtype
            # plain modules (nn.Linear, stock experts), no FP8Linear / Mxfp4 experts
            assert [type(m) for m in layer.modules()] == [type(m) for m in src_layers[i].modules()]
            for k, t in src_layers[i].state_dict().items():  # dequantized ~ original: the format was applied
                err = (got[k].float() - t.float()).abs().max()
                assert err <= (0.07 if fmt == "fp8" else 0.35) * t.float().abs().max() + 1e-6, (k, float(err))
        assert all(t.is_meta for t in lazy.layers[i].state_dict().values())


def test_fp8_partial_blocks_follow_the_format(tmp_path):
    """DeepSeek-V3's kv_a_proj_with_mqa ends in a partial block (576 rows = 4.5 x 128 on the Hub; here 24 rows in
    16-row blocks): its scale has ceil(24/16) = 2 rows. The lazy layer equals the format's definition computed by
    brute force from the files, W[r, c] * S[r // 16, c // 16], and is close to the bf16 source."""
    path = quantized_checkpoint("deepseek_v3", "fp8", tmp_path / "model", pad=True)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    disk = tensors_of(path)
    q, s = disk[name], disk[name.removesuffix("weight") + "weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and q.shape == (24, 32) and s.shape == (2, 2)
    rows, cols = torch.arange(24)[:, None] // 16, torch.arange(32)[None, :] // 16  # [24, 1], [1, 32]
    want = (q.float() * s[rows, cols]).to(torch.bfloat16)  # [24, 32]
    src = tensors_of(tmp_path / "model-bf16")[name].float()
    lazy = load_lazy(path)
    with lazy.layer(1) as layer:
        got = layer.self_attn.kv_a_proj_with_mqa.weight
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        assert (got.float() - src).abs().max() <= 0.07 * src.abs().max()
        whole = layer.self_attn.q_b_proj.weight  # whole blocks: transformers' own op, unchanged
        assert torch.equal(whole, load_dequantized(path).model.layers[1].self_attn.q_b_proj.weight)


def test_lazy_routed_statistics_equal_dequantized_in_memory(case):
    """Routed statistics of the lazy quantized model == those of the dequantized model loaded in memory by
    transformers (same batches). Tolerance: rtol 1e-9 / atol 1e-9 on the float64 sums (the runs are identical)."""
    family, _, path = case
    ref, lazy = load_dequantized(path), load_lazy(path)
    inputs = seeded_inputs(96, batch=3, seq_len=24, seed=2)
    sets = [CalibSet("s", inputs["input_ids"], inputs["attention_mask"], "-", "-", 1, 1)]
    got = collect(lazy.model, get_adapter(lazy.model.config), sets, layer_context=lazy.layer).stats["s"]
    want = collect(ref, get_adapter(ref.config, model=ref), sets).stats["s"]
    assert got.keys() == want.keys() and got
    for layer, stats in want.items():
        for name, t in stats.sums.items():
            torch.testing.assert_close(got[layer].sums[name], t, rtol=1e-9, atol=1e-9, msg=f"{family} {layer} {name}")
        assert stats.sums["tokens"].sum() > 0 and stats.sums[next(iter(stats.sums))].abs().sum() > 0


# ----------------------------------------------------------------------------------------------- streaming removal


def _expected(src: dict[str, torch.Tensor], kept: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """The pruned checkpoint as slices of the source tensors, by name patterns (not moeprune's classifier)."""
    out = {}
    for name, t in src.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(experts\.(\d+)\.|experts\.|gate\.|router\.)(.*)$", name)
        layer = int(m.group(1)) if m else None
        if m is None or layer not in kept:
            out[name] = t
        elif m.group(3) is not None:  # one expert's tensor (its scale too): kept ones renumbered in order
            j = int(m.group(3))
            if j in kept[layer]:
                out[f"model.layers.{layer}.mlp.experts.{kept[layer].index(j)}.{m.group(4)}"] = t
        else:  # fused experts (MXFP4 blocks and scales too) and router tensors: rows of the kept experts
            out[name] = t[kept[layer]]
    return out


def test_streaming_removal_keeps_the_format(case, tmp_path):
    family, fmt, path = case
    ckpt = Checkpoint.open(path)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    layers = adapter.moe_layers()
    dropped = {layer: DROPPED[n % len(DROPPED)] for n, layer in enumerate(layers)}
    kept = {layer: [j for j in range(8) if j not in drop] for layer, drop in dropped.items()}
    out = tmp_path / "out"
    out.mkdir()
    streaming.apply_plan_streaming(ckpt, adapter, PrunePlan(kept, 8, model_type=adapter.model_type), out, 60_000)

    got, want = tensors_of(out), _expected(tensors_of(path), kept)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(bits(got[name]), bits(t)), name
    scales = [k for k in got if k.endswith(("_scale_inv", "_scales")) and re.search(r"\.experts\.", k)]
    assert scales, "no expert scale tensor was carried"
    src_cfg, out_cfg = (json.loads((p / "config.json").read_text()) for p in (path, out))
    assert out_cfg["quantization_config"] == src_cfg["quantization_config"]
    assert Checkpoint.open(out).quantization.method == fmt  # headers of the result pass the format's checks

    # the stock dequantizing reload equals the original (dequantized) model with the removed experts masked
    inputs = seeded_inputs(96, batch=2, seq_len=24, seed=5)
    original, pruned = load_dequantized(path, torch.float32), load_dequantized(out, torch.float32)
    assert get_adapter(pruned.config, model=pruned).num_experts == 6
    with torch.no_grad():
        with masked_experts(original, get_adapter(original.config, model=original), dropped):
            ref = original(**inputs).logits
        logits = pruned(**inputs).logits
        full = original(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], ref[mask], rtol=1e-4, atol=1e-4)
    assert (full[mask] - ref[mask]).abs().max() > 1e-3  # the removal changed something: the test can fail


def test_prune_streaming_with_lazy_calibration_end_to_end(root, tmp_path):
    """`moeprune prune --lazy --streaming` on an FP8 DeepSeek-V3: lazy calibration on the quantized weights, plan,
    streaming apply, and the package's own verification (stock reload == masked original) passes; the output is
    FP8 with its quantization_config."""
    from moeprune import api
    from moeprune.calibration.run import CalibrateOptions
    from moeprune.tiny import tiny_tokenizer

    family, fmt, overrides = CASES["fp8-deepseek_v3"]
    path = quantized_checkpoint(family, fmt, tmp_path / "model", **overrides)
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path / "web.txt"
    text.write_text(" ".join(f"the fox {i} jumps over dog {i * 7}." for i in range(300)))
    calib = CalibrateOptions((f"web={text}",), samples=4, seq_len=24, lazy=True)
    result, verified = api.prune(path, tmp_path / "out", method="frequency", ratio=0.25, calib=calib, streaming=True)
    assert verified is not None and verified.passed and verified.max_abs_logit > 0
    out = Checkpoint.open(result.out)
    assert out.quantization.method == "fp8" and out.config_dict["n_routed_experts"] == 6
    assert out.config_dict["quantization_config"] == json.loads((path / "config.json").read_text())[
        "quantization_config"]
    experts = [e for e in out.entries if re.search(r"\.experts\.\d+\.up_proj\.weight$", e.name)]
    assert len(experts) == 6 * 2 and all(e.dtype == "F8_E4M3" for e in experts)


def test_block_quantized_router_refused_by_streaming(tmp_path):
    """A router quantized in [8, 8] blocks: one scale covers 8 experts' rows, so no expert can be cut out of it on
    the shards; refused before any byte is written (the lazy loader still reads it, dequantized)."""
    path = quantized_checkpoint("qwen3_moe", "fp8", tmp_path / "model", block=[8, 8], routers=True)
    ckpt = Checkpoint.open(path)
    assert ckpt.torch_dtypes()["model.layers.1.mlp.gate.weight"] == torch.float8_e4m3fn
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    plan = PrunePlan({layer: [0, 1, 3, 4, 6, 7] for layer in adapter.moe_layers()}, 8)
    (tmp_path / "out").mkdir()
    with pytest.raises(MoePruneError, match=r"model\.layers\.1\.mlp\.gate\.weight(_scale_inv)? is a quantized router"):
        streaming.apply_plan_streaming(ckpt, adapter, plan, tmp_path / "out", 60_000)
    assert not any((tmp_path / "out").iterdir())
    ref, lazy = load_dequantized(path), load_lazy(path)
    with lazy.layer(1) as layer:
        assert torch.equal(layer.mlp.gate.weight, ref.model.layers[1].mlp.gate.weight)


@pytest.mark.parametrize("how", [{"lazy": True}, {"lazy": False, "streaming": True}])
def test_block_quantized_router_refused_before_calibrating(tmp_path, no_work, how):
    """A run that will edit the shards refuses such a router from the headers, before calibrating (with `no_work`,
    any calibration or export step fails the test), and leaves the input and the output path as they were; the
    in-memory path is not refused (it dequantizes)."""
    from moeprune import api
    from moeprune.calibration.run import CalibrateOptions
    from moeprune.tiny import tiny_tokenizer
    from refusal import assert_refused

    path = quantized_checkpoint("qwen3_moe", "fp8", tmp_path / "model", block=[8, 8], routers=True)
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path / "web.txt"
    text.write_text(" ".join(f"the fox {i} jumps over dog {i * 7}." for i in range(300)))
    calib = CalibrateOptions((f"web={text}",), samples=4, seq_len=24)
    assert_refused(lambda: api.prune(path, tmp_path / "out", method="naee", ratio=0.25, calib=calib, **how),
                   r"edits the checkpoint's shards .* model\.layers\.1\.mlp\.gate\.weight(_scale_inv)? is a "
                   r"quantized router", inputs=[path], out=tmp_path / "out")


def test_in_memory_prune_writes_a_dequantized_checkpoint(root, tmp_path):
    """Without --streaming the model is pruned dequantized (bf16) in memory and saved so: no quantization_config,
    no float8 weight cast back without its scale. Its stock reload equals the original dequantized to bf16 by
    transformers with the removed experts masked (both run in float32; tolerance 1e-4). The data-free method's
    weight summaries come from the dequantized weights too. (The package's float32 verification compares with the
    float32 dequantization and sees the bf16 rounding, ~1e-2 of the logits: not asserted here.)"""
    from moeprune import api

    family, fmt, overrides = CASES["fp8-deepseek_v3"]
    path = quantized_checkpoint(family, fmt, tmp_path / "model", **overrides)
    result, _ = api.prune(path, tmp_path / "out", method="weight_norm", ratio=0.25, run_verify=False)
    out = Checkpoint.open(result.out)
    assert out.quantization is None and {e.dtype for e in out.entries} <= {"BF16", "F32"}
    dropped = {int(k): v for k, v in result.report["dropped_experts"].items()}
    assert all(len(v) == 2 for v in dropped.values())
    original, pruned = load_dequantized(path).float(), auto_class(out.config).from_pretrained(str(result.out)).float()
    inputs = seeded_inputs(96, batch=2, seq_len=24, seed=5)
    with torch.no_grad():
        with masked_experts(original, get_adapter(original.config, model=original), dropped):
            ref = original(**inputs).logits
        logits = pruned(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], ref[mask], rtol=1e-4, atol=1e-4)

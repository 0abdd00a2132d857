"""`moeprune budget`: sizes against real exports, the prediction against a by-hand recomputation over the grid,
and refusals before any work. The fake quantizer is the test's own round-to-nearest (not moeprune's)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import yaml

from moeprune.errors import MoePruneError
from moeprune.quant import budget as budget_module
from moeprune.quant.budget import BudgetOptions, budget
from moeprune.tiny import save_tiny

GROUP = 16


def rtn_reference(w: torch.Tensor, bits: int, group: int = GROUP) -> torch.Tensor:
    """Symmetric round-to-nearest per group of input columns: scale = max|w| / ((2^b − 1) / 2)."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    W = w.double().reshape(w.shape[0], -1, group)  # [out, groups, g]
    scale = W.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(W / scale), qmin, qmax) * scale).reshape(w.shape)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A bf16 tiny qwen3_moe (MoE layers 1, 2; E=8, I=16, H=32) with its tokenizer, text and statistics."""
    from moeprune.calibration.run import CalibrateOptions, calibrate

    root = tmp_path_factory.mktemp("budget")
    model = save_tiny("qwen3_moe", root / "model", seed=1, dtype=torch.bfloat16, with_tokenizer=True)
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghij "
    text = "".join(letters[int(i)] for i in torch.randint(0, len(letters), (20000,), generator=g))
    (root / "text.txt").write_text(text)
    calib = CalibrateOptions((f"web={root / 'text.txt'}",), samples=16, seq_len=64, held_out=0)
    calibrate(model, calib, root / "stats.safetensors")
    return root, model, root / "stats.safetensors", calib


def fq(w, bits):
    return rtn_reference(w, bits)


def test_sizes_match_the_checkpoint_and_a_real_pruned_export(setup, tmp_path):
    from moeprune import api

    root, model, stats, calib = setup
    opts = BudgetOptions(ratio_of_original=1.0, widths=(2,), group_size=GROUP, expert_ratios=(0.5,),
                         neuron_ratios=(), top=10)
    result = budget(model, stats, opts, fake_quant=fq)
    by_ratio = {c.expert_ratio: c for c in result.candidates if c.allocation.widths == (16,)}  # unquantized
    from moeprune.io.checkpoint import Checkpoint

    assert by_ratio[0.0].bytes == Checkpoint.open(model).total_bytes
    api.prune(model, tmp_path / "half", method="frequency", ratio=0.5, calib=calib, run_verify=False)
    # tensor bytes of the export's weights (its root also holds moeprune_stats.safetensors, which is no weight)
    weights = [e for e in Checkpoint.open(tmp_path / "half").entries if e.file.name != "moeprune_stats.safetensors"]
    assert by_ratio[0.5].bytes == sum(e.nbytes for e in weights)
    kept_by_prune = __import__("json").loads((tmp_path / "half" / "moeprune_report.json").read_text())["kept_experts"]
    assert {int(k): v for k, v in kept_by_prune.items()} == by_ratio[0.5].kept  # the recipe removes these experts


def test_prediction_equals_a_by_hand_recomputation_over_the_grid(setup):
    """PMQ loss shares, bytes and the best grid point recomputed here: frequency × relative RTN error per kept
    expert, Σ frequency of the removed experts, one width per layer by brute force under the byte budget."""
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.io.load import load_model
    from moeprune.stats.store import ExpertStats

    root, model_path, stats_path, _ = setup
    widths, ratios = (2, 4, 8), (0.25, 0.5)
    ckpt = Checkpoint.open(model_path)
    target = int(0.6 * ckpt.total_bytes)
    opts = BudgetOptions(bytes=target, widths=widths, group_size=GROUP, expert_ratios=ratios, neuron_ratios=(),
                         top=100)
    result = budget(model_path, stats_path, opts, fake_quant=fq)

    model = load_model(model_path)
    st = ExpertStats.load(stats_path).combined()
    freq = {layer: st[layer].sums["count"] / st[layer].sums["tokens"] for layer in (1, 2)}  # [E]
    mass = sum(float(f.sum()) for f in freq.values())
    rel = {}  # layer -> [E, B] relative squared error of the whole expert
    for layer in (1, 2):
        ex = model.model.layers[layer].mlp.experts
        I = ex.down_proj.shape[-1]
        rel[layer] = torch.zeros(8, len(widths), dtype=torch.float64)  # [E, B]
        for j in range(8):
            mats = [ex.gate_up_proj[j, :I].detach(), ex.gate_up_proj[j, I:].detach(), ex.down_proj[j].detach()]
            norm = sum(float(m.double().square().sum()) for m in mats)
            for n, b in enumerate(widths):
                rel[layer][j, n] = sum(float((m.float().double() - rtn_reference(m.float(), b)).square().sum())
                                           for m in mats) / norm
    E, H, I = 8, 32, 16
    expert_tensor_bytes = 8 * 2 * 3 * H * I * 2  # per layer, bf16
    router_bytes = 2 * 8 * H * 2
    fixed0 = ckpt.total_bytes - expert_tensor_bytes - router_bytes

    def expert_bytes(b):
        if b >= 16:
            return 3 * H * I * 2
        words = 2 * I * math.ceil(H * b / 32) + H * math.ceil(I * b / 32)  # gate, up [I, H]; down [H, I]
        scales = 2 * I * math.ceil(H / GROUP) + H * math.ceil(I / GROUP)
        return 4 * words + 2 * scales + 3 * 16

    best_by_hand = []
    for ratio in (0.0, *ratios):
        n_drop = round(ratio * E)
        kept = {layer: sorted(torch.argsort(freq[layer], descending=True, stable=True)[:E - n_drop].tolist())
                for layer in (1, 2)}
        removal = sum(float(freq[layer].sum() - freq[layer][kept[layer]].sum()) for layer in (1, 2)) / mass
        fixed = fixed0 + 2 * (E - n_drop) * H * 2
        options = []
        for choice in itertools.product(range(len(widths)), repeat=2):
            nbytes = fixed + sum((E - n_drop) * expert_bytes(widths[c]) for c in choice)
            if nbytes <= target:
                quant = sum(float((freq[layer][kept[layer]] * rel[layer][kept[layer], c]).sum())
                            for layer, c in zip((1, 2), choice, strict=True)) / mass
                options.append((removal + quant, nbytes, ratio, kept))
        if options:
            best_by_hand.append(min(options, key=lambda o: o[0]))
        unquantized = fixed + 2 * (E - n_drop) * expert_bytes(16)
        if unquantized <= target:
            best_by_hand.append((removal, unquantized, ratio, kept))
    best_by_hand.sort(key=lambda o: o[0])
    assert len(result.candidates) == len(best_by_hand) >= 2
    for cand, (loss, nbytes, ratio, kept) in zip(result.candidates, best_by_hand, strict=True):
        assert cand.expert_ratio == ratio
        assert cand.loss == pytest.approx(loss, rel=1e-6, abs=1e-12)
        assert cand.bytes == nbytes and cand.bytes <= target
        assert cand.kept == kept
    assert result.candidates[0].quant > 0  # something was quantized: the prediction is not trivially zero


def test_recipes_parse_and_the_cli_prints_them(setup, monkeypatch, capsys):
    from moeprune.cli import main
    from moeprune.pipeline.recipe import parse_recipe

    root, model, stats, _ = setup
    monkeypatch.setattr(budget_module, "rtn_fake_quant", lambda g, s: fq)
    assert main(["budget", str(model), str(stats), "--ratio-of-original", "0.6", "--group-size", str(GROUP),
                 "--widths", "2,4,8", "--expert-ratios", "0.25,0.5", "--neuron-ratios", "0.5", "--top", "2"]) == 0
    out = capsys.readouterr().out
    docs = [yaml.safe_load(part) for part in out.split("\n# recipe ")[1:]]
    assert len(docs) == 2
    quantized = [doc["stages"][-1] for doc in docs if doc["stages"][-1]["method"] == "quantize"]
    assert quantized
    for q in quantized:
        assert q["group_size"] == GROUP and set(q["bits"]) == {1, 2} and q["scheme"] in ("w2a16", "w4a16", "w8a16")
    for doc in docs:
        stages = doc["stages"]
        rest = [s for s in stages if s["method"] != "quantize"]
        if rest:
            parse_recipe({"stages": rest})  # the removal stages are ones moeprune runs


def test_camera_importance_needs_calibration_text_and_runs_with_it(setup):
    root, model, stats, calib = setup
    with pytest.raises(MoePruneError, match="needs neuron statistics"):
        budget(model, stats, BudgetOptions(ratio_of_original=0.6, importance="camera", group_size=GROUP),
               fake_quant=fq)
    opts = BudgetOptions(ratio_of_original=0.6, importance="camera", widths=(2, 4), group_size=GROUP,
                         expert_ratios=(0.5,), neuron_ratios=(0.5,), top=4)
    result = budget(model, stats, opts, calib=calib, fake_quant=fq)
    assert result.candidates and all(c.bytes <= result.target for c in result.candidates)
    losses = [c.loss for c in result.candidates]
    assert losses == sorted(losses) and losses[0] > 0


def forbid(name):
    def _fail(*args, **kwargs):
        raise AssertionError(f"{name} ran before the bad input was refused")

    return _fail


def test_bad_input_refused_before_any_work(setup, monkeypatch):
    root, model, stats, _ = setup
    monkeypatch.setattr(budget_module, "_weights_pass", forbid("_weights_pass"))
    monkeypatch.setattr(budget_module, "micro_errors", forbid("micro_errors"))
    with pytest.raises(MoePruneError, match="below the smallest model"):
        budget(model, stats, BudgetOptions(bytes=1000, group_size=GROUP), fake_quant=fq)
    with pytest.raises(MoePruneError, match="--measure"):
        BudgetOptions(bytes=10**9, measure=-1)
    with pytest.raises(MoePruneError, match="exactly one"):
        BudgetOptions(bytes=10**9, ratio_of_original=0.5)
    with pytest.raises(MoePruneError, match="cannot be stored"):
        BudgetOptions(bytes=10**9, widths=(4, 12))
    with pytest.raises(MoePruneError, match="cannot be stored"):
        BudgetOptions(bytes=10**9, widths=(1, 4))
    with pytest.raises(MoePruneError, match="always in the search"):
        BudgetOptions(bytes=10**9, widths=(4, 16))
    with pytest.raises(MoePruneError, match="does not divide"):
        budget(model, stats, BudgetOptions(ratio_of_original=0.6, group_size=128), fake_quant=fq)
    with pytest.raises(MoePruneError, match="calibrated criterion"):
        BudgetOptions(bytes=10**9, criterion="aimer")
    with pytest.raises(MoePruneError, match="Did you mean 'camera'"):
        BudgetOptions(bytes=10**9, importance="camra")
    other = save_tiny("qwen3_moe", root / "other", seed=2, num_experts=4)
    with pytest.raises(MoePruneError, match="another model"):
        budget(other, stats, BudgetOptions(ratio_of_original=0.6, group_size=GROUP), fake_quant=fq)

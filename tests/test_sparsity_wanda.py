"""Wanda / 2:4 / OWL inside routed experts (`sparsity/wanda.py`, `stages/sparsity.py`) against brute force.

The reference runs the original model over the same calibration windows with a pre-hook on each experts module
that captures the routed tokens, computes each expert's input norms and activations by hand (SiLU-GLU written in
the test), scores |W|·‖X‖ and builds the masks with plain Python sorts per row / per group of four. The export,
reloaded by stock `from_pretrained`, must equal the original with exactly those weights zeroed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.calibration.data import build_sets
from moeprune.calibration.run import CalibrateOptions, load_tokenizer
from moeprune.models import get_adapter
from moeprune.sparsity.wanda import outlier_count, owl_sparsities
from moeprune.stats.neurons import collect_neuron_stats
from moeprune.tiny import save_tiny
from refusal import assert_refused
from textgen import write_words

K = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wanda")
    write_words(root / "web.txt")
    save_tiny("qwen3_moe", root / "src", seed=5, with_tokenizer=True, num_experts_per_tok=K)
    return root


def calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48, held_out=0)


def float64_scorings(monkeypatch) -> list:
    """The shapes of the matrices `wanda_scores` scores whole in float64 from now on (a spy around the real one)."""
    import moeprune.sparsity.wanda as wanda

    full, scores = [], wanda.wanda_scores
    monkeypatch.setattr(wanda, "wanda_scores", lambda w, sq: full.append(w.shape) or scores(w, sq))
    return full


def routed_norms(model, ids):
    """{layer: (in_sq [E, H], act_sq [E, I])} from the routed tokens captured in a plain forward (by hand)."""
    adapter = get_adapter(model.config, model=model)
    seen, hooks = {}, []
    for layer in adapter.moe_layers():
        experts = adapter.experts(adapter.block(model, layer))
        hooks.append(experts.register_forward_pre_hook(
            lambda m, args, layer=layer: seen.setdefault(layer, []).append((args[0].detach(), args[1].detach()))))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        return {layer: by_hand_norms(adapter, model, layer, calls) for layer, calls in seen.items()}


def by_hand_norms(adapter, model, layer, calls):
    """One layer's (in_sq, act_sq): Σ x² of each expert's routed rows and Σ h² of h = silu(gate·x)·(up·x)."""
    block = adapter.block(model, layer)
    E, H, I = adapter.num_experts, model.config.hidden_size, adapter.expert_width
    in_sq, act_sq = torch.zeros(E, H, dtype=torch.float64), torch.zeros(E, I, dtype=torch.float64)
    for x, idx in calls:
        x = x.reshape(-1, H)
        for j in range(E):
            rows = x[(idx == j).any(dim=1)].double()  # the tokens routed to j
            v = adapter.expert_views(block, j)
            h = F.silu(rows @ v["gate"].double().T) * (rows @ v["up"].double().T)  # [n, I]
            in_sq[j] += rows.square().sum(0)
            act_sq[j] += h.square().sum(0)
    return in_sq, act_sq


def by_hand_mask(w, norms_sq, sparsity=None, groups=False):
    """keep [out, in] from Python sorts: per row the ⌊s·in⌋ lowest |w|·‖x‖ dropped, or 2 of every 4 kept."""
    score = (w.double().abs() * norms_sq.sqrt()[None, :]).tolist()
    keep = torch.ones(w.shape, dtype=torch.bool)
    for r, row in enumerate(score):
        if groups:
            for g in range(0, len(row), 4):
                best = sorted(range(g, g + 4), key=lambda c: (-row[c], c))[:2]
                for c in range(g, g + 4):
                    keep[r, c] = c in best
        else:
            for c in sorted(range(len(row)), key=lambda c: (row[c], c))[:int(sparsity * len(row))]:
                keep[r, c] = False
    return keep


def test_statistics_are_the_routed_tokens_input_norms(root):
    model = AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float32).eval()
    sets = build_sets(calib(root).calib_config(), load_tokenizer(root / "src", None))
    assert bool(sets[0].attention_mask.all())  # no padding: every captured row counts
    want = routed_norms(model, sets[0].input_ids)
    adapter = get_adapter(model.config, model=model)
    got = collect_neuron_stats(model, adapter, sets, gradients=False, batch_size=64)
    for layer, (in_sq, act_sq) in want.items():
        assert torch.allclose(got[layer].sums["in_sq"], in_sq, rtol=1e-9, atol=1e-9)
        assert torch.allclose(got[layer].sums["act_sq"], act_sq, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_export_is_the_original_with_the_by_hand_mask_zeroed(root, tmp_path, pattern, monkeypatch):
    stage = {"method": "wanda", "sparsity": 0.5} if pattern == "unstructured" else {"method": "wanda",
                                                                                     "pattern": "2:4"}
    full = float64_scorings(monkeypatch)  # the model's weights (Parameters) must take the float32 cut
    applied, result = moeprune.prune(root / "src", tmp_path / "w", recipe=[stage], calib=calib(root))
    assert (len(full) > 0) == (pattern == "2:4"), full
    assert result.passed  # verify: stock reload == the original with the plan's weights
    original = AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float32).eval()
    sets = build_sets(calib(root).calib_config(), load_tokenizer(root / "src", None))
    norms = routed_norms(original, sets[0].input_ids)
    adapter = get_adapter(original.config, model=original)
    reference = AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float32).eval()
    ref_adapter = get_adapter(reference.config, model=reference)
    zeros = total = 0
    keeps = {}
    with torch.no_grad():
        for layer, (in_sq, act_sq) in norms.items():
            for j in range(adapter.num_experts):
                views = adapter.expert_views(adapter.block(original, layer), j)
                ref_views = ref_adapter.expert_views(ref_adapter.block(reference, layer), j)
                for role, sq in (("gate", in_sq[j]), ("up", in_sq[j]), ("down", act_sq[j])):
                    keep = by_hand_mask(views[role], sq, 0.5, groups=pattern == "2:4")
                    keeps[f"layer.{layer}.expert.{j}.{role}"] = keep
                    ref_views[role].mul_(keep.float())
                    zeros += int((~keep).sum())
                    total += keep.numel()
    # the plan holds those masks as bits: bit k % 8 of byte k // 8 of row i is keep[i, k] (read here by shifts)
    plan = json.loads((tmp_path / "w" / "moeprune_plans" / "1-sparsity.json").read_text())
    assert plan["format"] == "moeprune.wanda/2" and plan["content"] == "masks"
    bits = load_file(tmp_path / "w" / "moeprune_plans" / plan["tensors"])
    assert bits.keys() == keeps.keys()
    for name, keep in keeps.items():
        k = torch.arange(keep.shape[1])
        assert bits[name].dtype == torch.uint8 and bits[name].shape == (keep.shape[0], (keep.shape[1] + 7) // 8)
        assert torch.equal((bits[name].long()[:, k // 8] >> (k % 8)) & 1, keep.long()), name
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "w", dtype=torch.float32).eval()
    want, got = reference.state_dict(), stock.state_dict()
    assert all(torch.equal(want[n], got[n]) for n in want)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert applied.report["summary"]["sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert len(applied.report["summary"]["tensors"]) == len(norms) * adapter.num_experts * 3
    if pattern == "2:4":  # every group of four consecutive inputs holds at most two non-zeros, in the file itself
        for name, t in load_file(tmp_path / "w" / "model.safetensors").items():
            if ".experts." in name and name.endswith("weight") and t.dim() >= 2:
                groups = (t != 0).reshape(*t.shape[:-1], t.shape[-1] // 4, 4).sum(-1)
                assert int(groups.max()) <= 2, name


def test_owl_layer_sparsities_by_hand(root, tmp_path, monkeypatch):
    # D = (0.01, 0.03, 0.02), λ = 0.08: r = 2λ·(D − min)/(max − min) = (0, 0.16, 0.08), mean 0.08
    assert owl_sparsities({0: 0.01, 1: 0.03, 2: 0.02}, 0.5, 0.08) == pytest.approx({0: 0.58, 1: 0.42, 2: 0.5})
    assert owl_sparsities({0: 0.2, 1: 0.2}, 0.3, 0.08) == {0: 0.3, 1: 0.3}
    # scores |w|·‖x‖ = (1, 1, 1, 9, 0, 0) · 2 (‖x‖ = 2): mean 4, one score above 2 × 4
    w, in_sq = torch.tensor([[1.0, -1.0, 1.0, -9.0, 0.0, 0.0]]), torch.full((6,), 4.0, dtype=torch.float64)
    assert [outlier_count(w, in_sq, t) for t in (8.0, 2.0, 1.9, 18.0)] == [1, 1, 4, 0]  # "above" is strict
    full = float64_scorings(monkeypatch)  # none: OWL counts and cuts in float32
    applied, result = moeprune.prune(root / "src", tmp_path / "o", recipe=[
        {"method": "wanda", "sparsity": 0.5, "owl": True, "owl_m": 3}], calib=calib(root))
    assert result.passed and not full, full
    layers = applied.report["summary"]["layers"]
    original = AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float32).eval()
    sets = build_sets(calib(root).calib_config(), load_tokenizer(root / "src", None))
    adapter = get_adapter(original.config, model=original)
    ratios = {}
    for layer, (in_sq, act_sq) in routed_norms(original, sets[0].input_ids).items():
        scores = []
        for j in range(adapter.num_experts):
            views = {r: t.detach() for r, t in adapter.expert_views(adapter.block(original, layer), j).items()}
            scores += [views[r].double().abs() * sq.sqrt()[None, :]
                       for r, sq in (("gate", in_sq[j]), ("up", in_sq[j]), ("down", act_sq[j]))]
        mean = sum(float(s.sum()) for s in scores) / sum(s.numel() for s in scores)
        ratios[layer] = sum(int((s > 3 * mean).sum()) for s in scores) / sum(s.numel() for s in scores)
        assert layers[str(layer)]["outlier_ratio"] == pytest.approx(ratios[layer], abs=1e-6)
    targets = {int(k): v["target"] for k, v in layers.items()}
    assert len(set(targets.values())) > 1 and sum(targets.values()) / len(targets) == pytest.approx(0.5, abs=1e-5)
    most = max(ratios, key=ratios.get)
    assert targets[most] == min(targets.values())  # the layer with the most outliers is pruned least
    assert max(targets.values()) - min(targets.values()) == pytest.approx(2 * 0.08)  # OWL's span: 2λ


@pytest.mark.parametrize("stage,match", [
    ({"method": "wanda", "pattern": "2:4", "sparsity": 0.6}, "its sparsity is 0.5"),
    ({"method": "wanda", "pattern": "2:4", "owl": True}, "drop --owl"),
    ({"method": "wanda", "owl_m": 4}, "add --owl"),
    ({"method": "wanda", "sparsity": 1.2}, "0 < sparsity < 1"),
    ({"method": "wanda", "ratio": 0.5}, "ratio does not apply"),
    ({"method": "wanda", "pattern": "3:4"}, "choose unstructured or 2:4"),
    ({"method": "wanda", "owl": True, "owl_lambda": 0.6}, "choose 0 <= λ"),
    ({"method": "wanda", "owl": True, "owl_lambda": 0.3}, r"choose 0 <= λ < 0\.250"),  # 0.5 + 2λ(1 − 1/L) passes 1
])
def test_refusals_before_any_work(root, tmp_path, no_work, stage, match):
    assert_refused(lambda: moeprune.prune(root / "src", tmp_path / "out", recipe=[stage], calib=calib(root)),
                   match, inputs=[root / "src"], out=tmp_path / "out")


def test_cli_prune_wanda(root, tmp_path, capsys):
    from moeprune.cli import main

    args = ["prune", str(root / "src"), "--method", "wanda", "--calib", f"web={root / 'web.txt'}", "--samples", "6",
            "--seq-len", "48"]
    assert main([*args, "--sparsity", "0.3", "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "moeprune_report.json").read_text())
    assert report["stages"][-1]["summary"]["sparsity"] == pytest.approx(0.3, abs=0.03)
    assert main([*args, "--ratio", "0.3", "--out", str(tmp_path / "d")]) == 2
    assert "ratio does not apply" in capsys.readouterr().err


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73, 0.97])
def test_masks_with_many_tied_scores_drop_the_lowest_index_first(sparsity):
    """Weights on a coarse grid and equal input norms: whole runs of equal scores straddle each row's cut, and the
    kthvalue cut (sparsity/wanda.py) must drop exactly the entries Python's sort by (score, index) drops first."""
    from moeprune.sparsity.wanda import unstructured_mask, wanda_scores

    g = torch.Generator().manual_seed(3)
    w = torch.randint(-3, 4, (12, 40), generator=g).float() / 2  # 7 distinct values: many ties
    norms_sq = torch.ones(40, dtype=torch.float64)
    got = unstructured_mask(wanda_scores(w, norms_sq), sparsity)
    assert torch.equal(got, by_hand_mask(w, norms_sq, sparsity))
    assert int((~got).sum(dim=1).unique()) == int(sparsity * 40)  # exactly ⌊s·in⌋ per row


def test_score_mass_is_the_sum_of_the_scores():
    """Σ S from column sums against the scores made and summed (an expert with tokens, and one without: |W|)."""
    from moeprune.sparsity.wanda import score_mass, wanda_scores

    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 9, generator=g).to(torch.bfloat16)
    for in_sq in (torch.rand(9, generator=g, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)):
        got, n = score_mass(w, in_sq)
        want = wanda_scores(w, in_sq)
        assert n == want.numel() and got == pytest.approx(float(want.sum()), rel=1e-12)
        assert outlier_count(w, in_sq, 1.5 * got / n) == int((want > 1.5 * float(want.mean())).sum())


def test_a_plan_of_masked_values_is_still_applied(root, tmp_path):
    """Plans written before wanda stored bits held the masked values (format moeprune.wanda/1). Such a plan, made
    here from the original's tensors and the bits of a new plan (read by shifts), replays through `moeprune apply
    --recipe` to the same export; a wanda/2 plan that does not say it holds masks is refused."""
    from moeprune.cli import main
    from moeprune.stages.weights_plan import WeightsPlan

    out = moeprune.prune(root / "src", tmp_path / "new", recipe=[{"method": "wanda", "sparsity": 0.5}],
                         calib=calib(root), run_verify=False)[0].out
    plans = out / "moeprune_plans"
    raw = json.loads((plans / "1-sparsity.json").read_text())
    bits = load_file(plans / raw["tensors"])
    original = load_file(root / "src" / "model.safetensors")
    values: dict = {}
    for name, b in bits.items():
        _, layer, _, j, role = name.split(".")
        w = original[f"model.layers.{layer}.mlp.experts.{j}.{role}_proj.weight"]
        k = torch.arange(w.shape[1])
        keep = ((b.long()[:, k // 8] >> (k % 8)) & 1).bool()
        values.setdefault(int(layer), {}).setdefault(int(j), {})[role] = w * keep
    old = tmp_path / "old"
    __import__("shutil").copytree(out, old)
    WeightsPlan("wanda", raw["num_experts"], raw["width"], values, settings=raw["settings"], summary=raw["summary"],
                model_type=raw["model_type"]).save(old / "moeprune_plans" / "1-sparsity.json")
    assert json.loads((old / "moeprune_plans" / "1-sparsity.json").read_text())["format"] == "moeprune.wanda/1"
    assert main(["apply", str(root / "src"), "--recipe", str(old), "--out", str(tmp_path / "again")]) == 0
    want, got = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    raw.pop("content")
    (plans / "1-sparsity.json").write_text(json.dumps(raw))
    with pytest.raises(moeprune.MoePruneError, match="packed keep masks"):
        moeprune.api.apply_plan(root / "src", plans / "1-sparsity.json", tmp_path / "bad")


@pytest.mark.parametrize("case", ["random-bf16", "grid-ties", "near-ties", "colliding-products", "no-tokens",
                                  "some-zero-norms", "tiny-norms", "huge-float64"])
def test_float32_preselection_gives_the_by_hand_masks(case):
    """`wanda_mask` cuts in float32 and settles a band around the cut in float64: its masks equal Python's sort by
    (float64 score, index) (`by_hand_mask`), with heavy ties, experts no token reached, scores far below float32's
    normal range and float64 scores that overflow float32 (the float64 path); the weight is left unchanged."""
    from moeprune.sparsity.wanda import wanda_mask

    g = torch.Generator().manual_seed(sum(map(ord, case)))
    w = torch.randn(24, 200, generator=g)
    norms_sq = torch.rand(200, generator=g, dtype=torch.float64)
    if case == "random-bf16":
        w = w.bfloat16()
    elif case == "grid-ties":
        w = torch.randint(-3, 4, (24, 200), generator=g).float() / 2
        norms_sq = torch.randint(1, 4, (200,), generator=g).double()
    elif case == "near-ties":  # equal in float32, ordered in float64: only the float64 band can order them
        w = torch.randint(1, 4, (24, 200), generator=g).float()
        norms_sq = 1 + 1e-10 * torch.rand(200, generator=g, dtype=torch.float64)
    elif case == "colliding-products":  # products of different weights and norms that float32 rounds out of
        g = torch.Generator().manual_seed(4)  # order (found by search: a cut at τ32 exactly gets 2 entries wrong)
        w = torch.randint(1000, 1100, (24, 200), generator=g).double() / 1024
        norms_sq = (1100.0 / torch.randint(1000, 1100, (200,), generator=g).double()) ** 2 * (
            1 + 1e-9 * torch.rand(200, generator=g, dtype=torch.float64))
    elif case == "no-tokens":
        norms_sq = torch.zeros(200, dtype=torch.float64)
    elif case == "some-zero-norms":
        norms_sq[::7] = 0
    elif case == "tiny-norms":
        norms_sq = norms_sq * 1e-80
    else:
        w = w.double() * 1e30
    before = w.clone()
    # an expert no token reached is scored by |W| (the module's fallback): the by-hand sort sees unit norms
    ref_sq = torch.ones_like(norms_sq) if case == "no-tokens" else norms_sq
    for sparsity in (0.1, 0.5, 0.73):
        assert torch.equal(wanda_mask(w, norms_sq, "unstructured", sparsity), by_hand_mask(w, ref_sq, sparsity))
    # OWL's outlier count, by the same float32 cut and band, against the float64 scores made here: thresholds at
    # scores themselves (the strict ">" at a tie), just beside them, at the mean's multiples, and outside the range
    score = w.double().abs() * ref_sq.sqrt()[None, :]
    flat = score.flatten().sort().values
    picks = [float(flat[i]) for i in (0, len(flat) // 3, len(flat) // 2, -2)]
    for t in [*picks, *(math.nextafter(p, math.inf) for p in picks), *(math.nextafter(p, 0) for p in picks),
              *(m * float(score.mean()) for m in (1, 3, 5)), 0.0, float(flat[-1]) * 2]:
        assert outlier_count(w, norms_sq, t) == int((score > t).sum()), t
    assert torch.equal(w, before)


def test_kth_smallest_on_the_bits_is_numpys_float_selection():
    """The uint32 selection returns what numpy's float32 partition returns, with zeros, ties, +inf and NaNs of both
    signs in the rows (scores are |w|·‖X‖ ≥ +0.0, or NaN)."""
    import numpy as np

    from moeprune.sparsity.wanda import _kth_smallest32

    rng = np.random.default_rng(7)
    s = np.abs(rng.standard_normal((9, 64)).astype(np.float32))
    s[0, :10] = 0
    s[1] = np.round(s[1])  # ties
    s[2, 5], s[3, :40] = np.inf, np.inf
    s[4, 3], s[5, :50] = np.float32("nan"), -np.float32("nan")
    for k in (0, 13, 31, 63):
        want = np.partition(s, k, axis=1)[:, k : k + 1]
        got = _kth_smallest32(s, k)
        assert got.dtype == np.float32 and got.shape == (9, 1)
        assert np.array_equal(got, want, equal_nan=True), k

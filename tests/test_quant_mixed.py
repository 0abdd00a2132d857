"""Mixed precision wired into the quantize stage and `moeprune budget --measure`.

- `avg_bits`: the stage's per-layer widths equal a brute force over every per-layer assignment, with the PMQ loss
  table computed HERE from its formula (frequency × relative RTN error; the RTN is this test suite's own
  `rtn_reference`, the frequencies the routed counts of the calibration the stage ran);
- the bytes written equal the bytes computed here from the shapes (pack-quantized int32 words, float32 scales, the
  int64 shape tensor, everything else at its stored dtype), and `max_bytes` is respected;
- the export's logits equal the original with every expert weight replaced by dequantize(quantize(W)) at the
  allocated widths (plain torch, `fake_quantized_reference`);
- refusals before any work; layer-by-layer loading of a mixed-width export refused with the reason;
- `budget --measure 1` prints the held-out perplexity that evaluating that recipe's export here gives.
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
import yaml

from moeprune import api
from moeprune.calibration.run import CalibrateOptions
from moeprune.errors import MoePruneError
from moeprune.tiny import save_tiny
from test_quant_math import rtn_reference

pytest.importorskip("compressed_tensors")
from test_quant_export import fake_quantized_reference  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
G = 8
WIDTHS = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    g = torch.Generator().manual_seed(3)
    for name, n in (("web", 4000), ("heldout", 1500)):
        (root / f"{name}.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 12, (n,), generator=g)))
    save_tiny("qwen3_moe", root / "model", seed=7, with_tokenizer=True)  # float32; MoE layers 1, 2; E=8, I=16, H=32
    return root


def calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48, held_out=0)


def report(path) -> dict:
    return json.loads((path / "moeprune_report.json").read_text())


def expert_weights(path) -> dict[int, dict[str, torch.Tensor]]:
    """layer -> {"gate", "up": [E, I, H], "down": [E, H, I]} read from the original (module names, not moeprune)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = {}
    for name, p in model.named_parameters():
        m = re.match(r".*layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if m:
            d = out.setdefault(int(m.group(1)), {})
            if m.group(2) == "gate_up_proj":
                half = p.shape[1] // 2
                d["gate"], d["up"] = p[:, :half].detach(), p[:, half:].detach()
            else:
                d["down"] = p.detach()
    return out


def pmq_table(weights, freq) -> dict[int, torch.Tensor]:
    """loss[ℓ][j, b] = f_j · Σ_m ‖W_m − Q_b(W_m)‖² / Σ_m ‖W_m‖² over the expert's matrices m (gate, up, down)."""
    out = {}
    for layer, roles in weights.items():
        E = roles["down"].shape[0]
        table = torch.zeros(E, len(WIDTHS), dtype=torch.float64)
        for j in range(E):
            norm = sum(float(w[j].double().square().sum()) for w in roles.values())
            for n, b in enumerate(WIDTHS):
                err = sum(float((w[j].double() - rtn_reference(w[j].clone(), b, G)[3].double()).square().sum())
                          for w in roles.values())
                table[j, n] = freq[layer][j] * err / norm
        out[layer] = table
    return out


def frequencies(export) -> dict[int, list[float]]:
    """f_j = routed tokens of expert j / tokens, from the routed statistics the stage collected (in the export)."""
    from moeprune.stats.store import ExpertStats

    st = ExpertStats.load(export / "moeprune_stats.safetensors").combined()
    return {layer: (s.sums["count"].double() / s.sums["tokens"].double()).tolist() for layer, s in st.items()}


def packed_bytes(out: int, inp: int, bits: int, scale_bytes: int = 4) -> int:
    return out * math.ceil(inp * bits / 32) * 4 + out * (inp // G) * scale_bytes + 16


def expected_bytes(original, layer_bits: dict[int, int]) -> int:
    """Non-expert tensors as stored in the original + every expert's gate/up [I, H] and down [H, I] packed."""
    from moeprune.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(original)
    fixed = sum(e.nbytes for e in ckpt.entries if not re.search(r"mlp\.experts\.\d+\.", e.name))
    E, H, I = ckpt.config.num_experts, ckpt.config.hidden_size, ckpt.config.moe_intermediate_size
    experts = sum(E * (2 * packed_bytes(I, H, b) + packed_bytes(H, I, b)) for b in layer_bits.values())
    return fixed + experts


def written_bytes(export) -> int:
    from moeprune.io.checkpoint import Checkpoint

    return sum(e.nbytes for e in Checkpoint.open(export).entries if e.file.name != "moeprune_stats.safetensors")


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def avg(root):
    out = root / "avg"
    api.quantize(root / "model", out, calib=calib(root), group_size=G, avg_bits=3.5, widths=list(WIDTHS),
                 allocate="pmq", run_verify=False)
    return out


def test_avg_bits_equals_brute_force_over_per_layer_widths(root, avg):
    alloc = report(avg)["allocation"]
    table = pmq_table(expert_weights(root / "model"), frequencies(avg))
    layers = sorted(table)
    E = table[layers[0]].shape[0]
    best = min((sum(float(table[layer][:, WIDTHS.index(b)].sum()) for layer, b in zip(layers, bs, strict=True)), bs)
               for bs in itertools.product(WIDTHS, repeat=len(layers))
               if sum(bs) * E <= 3.5 * E * len(layers))  # equal params per layer: Σ b·n ≤ 3.5·Σ n
    assert {int(k): v for k, v in alloc["layer_bits"].items()} == dict(zip(layers, best[1], strict=True))
    assert alloc["predicted_loss"] == pytest.approx(best[0], rel=1e-6)
    assert len(set(best[1])) > 1  # the instance is not trivially uniform
    assert alloc["importance"] == "pmq" and alloc["granularity"] == "layer"


def test_bytes_written_and_logits_match_the_widths(root, avg):
    from moeprune.io.load import load_model

    layer_bits = {int(k): v for k, v in report(avg)["allocation"]["layer_bits"].items()}
    assert written_bytes(avg) == expected_bytes(root / "model", layer_bits) == report(avg)["allocation"][
        "bytes_written"]
    want = logits(fake_quantized_reference(root / "model", 4, (), layer_bits=layer_bits))
    got = logits(load_model(avg, dtype="float32"))
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert got.abs().max() > 0


def test_max_bytes_is_respected(root, tmp_path):
    limit = expected_bytes(root / "model", {1: 4, 2: 3}) + 100
    out = tmp_path / "bytes"
    api.quantize(root / "model", out, calib=calib(root), group_size=G, max_bytes=limit, widths=list(WIDTHS),
                 allocate="pmq", run_verify=False)
    alloc = report(out)["allocation"]
    layer_bits = {int(k): v for k, v in alloc["layer_bits"].items()}
    assert written_bytes(out) == expected_bytes(root / "model", layer_bits) <= limit
    assert alloc["within_budget"] and alloc["max_bytes"] == limit
    # the best per-layer choice under the limit, by the same brute force
    table = pmq_table(expert_weights(root / "model"), frequencies(out))
    fits = [bs for bs in itertools.product(WIDTHS, repeat=2) if expected_bytes(root / "model", dict(zip((1, 2), bs,
                                                                                                      strict=True)))
            <= limit]
    best = min(fits, key=lambda bs: sum(float(table[layer][:, WIDTHS.index(b)].sum())
                                        for layer, b in zip((1, 2), bs, strict=True)))
    assert (layer_bits[1], layer_bits[2]) == best


def test_per_expert_export_reports_servability_and_lift(root, tmp_path):
    out = tmp_path / "expert"
    api.quantize(root / "model", out, calib=calib(root), group_size=G, avg_bits=3.5, granularity="expert",
                 allocate="pmq", run_verify=False)
    alloc = report(out)["allocation"]
    assert alloc["layer_bits"] is None and alloc["expert_bits"] is not None
    assert "moeprune.load_model" in alloc["loaded_by"] and "vLLM" in alloc["servable_by"]
    lift = alloc["lift_per_layer"]
    assert lift["loss_of_lifting"] >= 0 and lift["per_expert_loss"] == pytest.approx(alloc["predicted_loss"])


def forbid(name):
    def _fail(*args, **kwargs):
        raise AssertionError(f"{name} ran before the bad input was refused")

    return _fail


def test_refusals_before_any_work(root, tmp_path, monkeypatch):
    import moeprune.pipeline.run as run_module

    monkeypatch.setattr(run_module, "prepare", forbid("calibration data preparation"))
    model, c = root / "model", calib(root)
    with pytest.raises(MoePruneError, match="give one of the two"):
        api.quantize(model, tmp_path / "a", calib=c, avg_bits=3.0, bits={1: 4})
    with pytest.raises(MoePruneError, match="add --avg-bits"):
        api.quantize(model, tmp_path / "b", calib=c, allocate="camera")
    with pytest.raises(MoePruneError, match="below the smallest possible model"):
        api.quantize(model, tmp_path / "c", calib=c, group_size=G, avg_bits=1.5)
    with pytest.raises(MoePruneError, match="below the smallest possible model"):
        api.quantize(model, tmp_path / "d", calib=c, group_size=G, max_bytes="20KB")
    with pytest.raises(MoePruneError, match="one budget"):
        api.quantize(model, tmp_path / "e", calib=c, avg_bits=3.0, max_bytes="1GB")
    with pytest.raises(MoePruneError, match="importance"):
        api.quantize(model, tmp_path / "f", calib=c, avg_bits=3.0, allocate="hessian")
    with pytest.raises(MoePruneError, match="calibration data"):
        api.quantize(model, tmp_path / "g", group_size=G, avg_bits=3.0, allocate="pmq")  # needs routed statistics
    with pytest.raises(MoePruneError, match="calibration|--calib"):
        api.quantize(model, tmp_path / "g2", group_size=G, avg_bits=3.0)  # the default, camera: neuron statistics
    with pytest.raises(MoePruneError, match="layer by layer.*several widths"):
        api.quantize(model, tmp_path / "i", group_size=G, bits={1: 8}, lazy=True)  # layer 2 keeps w4


def test_lazy_run_with_mixed_widths_refused_before_calibration(root, tmp_path, monkeypatch):
    from moeprune.pipeline.context import StageContext

    monkeypatch.setattr(StageContext, "routed_stats", forbid("calibration"))
    with pytest.raises(MoePruneError, match="layer by layer.*several widths"):  # its verification could not load it
        api.quantize(root / "model", tmp_path / "h", calib=calib(root), group_size=G, avg_bits=3.0, lazy=True)


def test_lazy_loading_of_mixed_widths_is_refused(root, avg):
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.io.fit import choose_lazy
    from moeprune.io.lazy import load_lazy

    with pytest.raises(MoePruneError, match="ONE config group"):
        load_lazy(avg)
    with pytest.raises(MoePruneError, match="several widths"):
        choose_lazy(True, Checkpoint.open(avg))


def test_budget_measure_prints_the_perplexity_of_the_recipe_export(root, tmp_path, capsys):
    from moeprune.cli import main
    from moeprune.eval.run import EvalOptions, evaluate
    from moeprune.pipeline.recipe import parse_recipe

    model, c = root / "model", calib(root)
    api.calibrate(model, c, tmp_path / "stats.safetensors")
    capsys.readouterr()
    assert main(["budget", str(model), str(tmp_path / "stats.safetensors"), "--ratio-of-original", "0.7",
                 "--widths", "2,4,8", "--group-size", str(G), "--expert-ratios", "0.25", "--neuron-ratios", "0",
                 "--top", "1", "--measure", "1", "--calib", f"web={root / 'web.txt'}", "--samples", "6",
                 "--seq-len", "48", "--held-out", "0", "--data", f"heldout={root / 'heldout.txt'}",
                 "--eval-seq-len", "32", "--eval-max-sequences", "8"]) == 0
    out = capsys.readouterr().out
    recipe = yaml.safe_load(out.split("# recipe 1:", 1)[1].split("\n", 1)[1].split("\n#", 1)[0])
    row = next(line for line in out.splitlines() if re.match(r"\s+1\s+\d", line)).split()
    printed = float(row[-1])
    needs_calib = any(n.calibrated for s in parse_recipe(recipe) for n in s.needs)
    api.prune(model, tmp_path / "recipe", recipe, calib=c if needs_calib else None, run_verify=False)
    opts = EvalOptions((f"heldout={root / 'heldout.txt'}",), seq_len=32, max_sequences=8)
    ppl = evaluate(tmp_path / "recipe", opts).scores["heldout"].perplexity
    assert printed == pytest.approx(ppl, rel=1e-6)
    original = evaluate(model, opts).scores["heldout"].perplexity
    assert float(row[2]) == pytest.approx(ppl / original, rel=1e-4)  # the measured ratio column

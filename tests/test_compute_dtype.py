"""`--dtype auto` on a CPU without native bf16 matmul computes in float32 (io/stock.compute_dtype).

References: the rule as the docstring states it, written out per case; and routing counts brute-forced from a stock
`from_pretrained` model in the expected dtype (its own router logits, softmax, top-k), never from moeprune's
engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeprune.calibration.run import CalibrateOptions, calibrate, prepare
from moeprune.errors import MoePruneError
from moeprune.io import stock
from moeprune.tiny import save_tiny


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(stock, "cpu_has_native_bf16", lambda: False)


@pytest.mark.parametrize("requested, device, fast, want", [
    ("auto", "cpu", False, "float32"),
    ("auto", "cpu", True, "auto"),
    ("auto", "cuda", False, "auto"),  # the rule is about the CPU's matmul only
    ("auto", "cuda:1", False, "auto"),
    ("stored", "cpu", False, "stored"),
    ("bfloat16", "cpu", False, "bfloat16"),
    ("float16", "cpu", False, "float16"),
    ("float32", "cuda", True, "float32"),
])
def test_rule(monkeypatch, requested, device, fast, want):
    monkeypatch.setattr(stock, "cpu_has_native_bf16", lambda: fast)
    assert stock.compute_dtype(requested, device) == want


def test_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(MoePruneError, match="unknown dtype 'float8'.*stored"):
        stock.compute_dtype("float8", "cpu")
    with pytest.raises(MoePruneError, match="unknown dtype"):
        CalibrateOptions(("web=x.txt",), dtype="half")


def test_options_resolve_once_and_survive_replace(no_native_bf16):
    """dataclasses.replace runs __post_init__ again: a resolved value must not change meaning (a bug found while
    writing this: "stored" resolved to "auto", which the second pass turned into float32)."""
    auto = CalibrateOptions(("web=x.txt",))
    stored = CalibrateOptions(("web=x.txt",), dtype="stored")
    assert auto.dtype == "float32" and stored.dtype == "stored"
    assert dataclasses.replace(auto, batch_size=2).dtype == "float32"
    assert dataclasses.replace(stored, batch_size=2, lazy=True).dtype == "stored"


def test_stored_loads_the_checkpoint_dtype():
    assert stock.parse_dtype("stored") == stock.parse_dtype("auto") == "auto"


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdtype")
    model = save_tiny("qwen3_moe", root / "model", seed=2, dtype=torch.bfloat16, with_tokenizer=True)
    g = torch.Generator().manual_seed(1)
    text = "".join("abcdefgh ij"[int(i)] for i in torch.randint(0, 11, (8000,), generator=g))
    (root / "text.txt").write_text(text)
    return root, model


def _brute_counts(model_path, input_ids, dtype) -> dict[int, torch.Tensor]:
    """Per MoE layer, how often each expert is in a token's top-k, from a stock model's own router logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    cfg = model.config
    with torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True)
    moe = [i for i in range(cfg.num_hidden_layers) if i not in getattr(cfg, "mlp_only_layers", [])
           and (i + 1) % cfg.decoder_sparse_step == 0]
    assert len(out.router_logits) == len(moe)
    counts = {}
    for layer, logits in zip(moe, out.router_logits, strict=True):  # [B·T, E]
        top = logits.float().softmax(-1).topk(cfg.num_experts_per_tok, dim=-1).indices
        counts[layer] = torch.bincount(top.flatten(), minlength=cfg.num_experts).double()
    return counts


@pytest.mark.parametrize("requested, want", [("auto", torch.float32), ("stored", torch.bfloat16)])
def test_calibration_computes_in_the_chosen_dtype(no_native_bf16, bf16_model, requested, want):
    root, model = bf16_model
    opts = CalibrateOptions((f"web={root / 'text.txt'}",), samples=6, seq_len=24, held_out=0, batch_size=6,
                            dtype=requested)
    ids = torch.cat([s.input_ids for s in prepare(model, opts)[2]])  # [6, 24]: the windows calibration uses
    stats = calibrate(model, opts)
    assert stats.meta["dtype"] == str(want).removeprefix("torch.")
    brute = _brute_counts(model, ids, want)
    got = stats.combined()
    assert sorted(got) == sorted(brute)
    for layer, counts in brute.items():
        torch.testing.assert_close(got[layer].sums["count"], counts, rtol=0, atol=0)

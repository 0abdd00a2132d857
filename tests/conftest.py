"""Fixtures shared by the bad-input tests: tiny checkpoints (MoE, group-limited, dense, unsupported MoE),
a copier for checkpoints a test may break, and `no_work`, which makes every expensive step fail loudly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moeprune.tiny import save_tiny

# Tiny models run fastest on one torch thread, and one thread cannot thrash: with two OpenMP threads on a
# 2-core machine whose other core is busy, a 6 ms forward took 0.8 s (measured while a benchmark ran).
torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def qwen(root) -> Path:
    """qwen3_moe tiny: 3 layers, layer 0 dense, MoE layers 1 and 2, E=8, top-2."""
    return save_tiny("qwen3_moe", root / "qwen3_moe", seed=1)


@pytest.fixture(scope="module")
def deepseek(root) -> Path:
    """deepseek_v3 tiny: MoE layers 1 and 2, E=8 in 2 router groups of 4, top-2 from 1 group."""
    return save_tiny("deepseek_v3", root / "deepseek_v3", seed=1)


SMALL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=96, num_hidden_layers=2,
             max_position_embeddings=64)


def _save_random(path: Path, model_type: str, **overrides) -> Path:
    """A small randomly initialised stock model of `model_type`, saved with save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SMALL, **overrides)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense(root) -> Path:
    return _save_random(root / "dense_qwen3", "qwen3", intermediate_size=48, head_dim=8)


@pytest.fixture(scope="module")
def unknown_moe(root) -> Path:
    """A checkpoint whose config says MoE (E=8, top-2) in a family moeprune has no adapter for (every MoE family
    of the installed transformers has one or is refused, so a Llama config carries the expert keys here)."""
    path = _save_random(root / "unknown_moe", "llama", intermediate_size=48, num_local_experts=8,
                        num_experts_per_tok=2)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # precondition of the test: the saved layout is one the generic fallback cannot recognise
    assert not any(".experts." in k for k in keys), keys
    return path


@pytest.fixture
def copy_of(tmp_path):
    """A private copy of a checkpoint (for tests that corrupt it or could, if buggy, delete it)."""

    def _copy(src: Path, name: str = "model") -> Path:
        return Path(shutil.copytree(src, tmp_path / "inputs" / name))

    return _copy


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive step fail loudly: a refusal must come before any of them."""

    def forbid(name):
        def _fail(*args, **kwargs):
            raise AssertionError(f"{name} ran before the bad input was refused")

        return _fail

    from moeprune.select import build

    monkeypatch.setattr(build, "summarize_checkpoint", forbid("select.build.summarize_checkpoint"))
    from moeprune.pipeline import context, export, verify
    from moeprune.surgery import in_memory, streaming

    for module, name in ((export, "load_model"), (context, "load_model"), (in_memory, "apply_plan"),
                         (in_memory, "prune_layer"), (streaming, "apply_plan_streaming"), (export, "atomic_dir"),
                         (verify, "load_model")):
        monkeypatch.setattr(module, name, forbid(f"{module.__name__}.{name}"))
    from moeprune.calibration import run

    for name in ("load_model", "collect"):
        monkeypatch.setattr(run, name, forbid(f"calibration.run.{name}"))
    from moeprune.quant import run as quant_run

    monkeypatch.setattr(quant_run, "quantize_model", forbid("quant.run.quantize_model"))


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Token-id caches go to a temporary folder (tests leave no files behind, and never read a user's cache);
    session scope, so module and session fixtures that build calibration sets see it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEPRUNE_TOKEN_CACHE", str(tmp_path_factory.mktemp("token-cache")))
        yield


# ------------------------------------------------------------------------------------- GGUF (test_gguf*.py)
# a small trained testbed, its 25 % pruned export and that export's f32 GGUF: built once per session

@pytest.fixture(scope="session")
def gguf_pruned(tmp_path_factory):
    """(a small trained testbed: 2 layers, 8 experts of width 16, hidden 32; its 25 % frequency-pruned export,
    6 experts per layer)."""
    from moeprune import api
    from moeprune.calibration.run import CalibrateOptions
    from moeprune.testbed import TestbedConfig, build_testbed

    cfg = TestbedConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                        num_experts=8, top_k=2, moe_intermediate_size=16, seq_len=32, batch_size=8, steps=12,
                        lr=3e-3, warmup=4, train_chars=30_000, calib_chars=6_000, heldout_chars=6_000,
                        tokenizer_chars=10_000)
    root = tmp_path_factory.mktemp("gguf")
    tb = build_testbed(root / "tb", cfg=cfg)
    api.prune(tb.path, root / "p25", method="frequency", ratio=0.25,
              calib=CalibrateOptions(tb.specs("calib"), samples=16, seq_len=32))
    return tb.path, root / "p25"


@pytest.fixture(scope="session")
def gguf_pruned_file(gguf_pruned, tmp_path_factory):
    """(GgufSummary, path) of `gguf_pruned`'s export converted to an f32 GGUF."""
    from moeprune.gguf import GgufOptions, export_gguf

    out = tmp_path_factory.mktemp("gguf_out") / "p25.gguf"
    return export_gguf(gguf_pruned[1], out, GgufOptions(outtype="f32")), out

"""Layer-by-layer verify (`verify(..., lazy=True)`, `pipeline/verify_layered.py`) on tiny qwen3_moe, deepseek_v3
(grouped router), gpt_oss (fused on disk, biases) and mixtral exports made by `moeprune.prune` in memory.

The independent reference is the whole-model verify (both checkpoints loaded whole, the original under the
chained references, one logits comparison): the layered run must pass where it passes and give the same logits
figure. A tampered expert in one layer must fail and be named; per-layer references must equal the whole-model
reference on their layer and leave every other layer untouched; at most one layer of each model is materialised at
a time."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeprune
from moeprune import api
from moeprune.calibration.data import CalibConfig, CalibSource, build_sets
from moeprune.calibration.run import CalibrateOptions
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.io.lazy import LazyModel
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.pipeline.recipe import read_chain
from moeprune.pipeline.run import VERIFY_WINDOWS
from moeprune.pipeline.verify import first_windows, seeded_inputs, verify
from moeprune.stages.reference import Reference
from moeprune.tiny import FAMILY_CONFIGS, save_tiny, tiny_tokenizer
from textgen import write_words

FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral")
CASES = {  # id -> (family, recipe)
    "qwen3_moe-experts": ("qwen3_moe", [{"method": "reap", "ratio": 0.25}]),
    "qwen3_moe-experts-neurons": ("qwen3_moe", [{"method": "reap", "ratio": 0.25},
                                                {"method": "heapr", "ratio": 0.5}]),
    "deepseek_v3-msmoe-weighted": ("deepseek_v3", [{"method": "msmoe", "ratio": 0.25, "router": "weighted"}]),
    "deepseek_v3-merge-neurons": ("deepseek_v3", [{"method": "msmoe", "ratio": 0.25},
                                                  {"method": "camera", "ratio": 0.5}]),
    "gpt_oss-dern": ("gpt_oss", [{"method": "dern", "ratio": 0.25, "threshold": 0.0}]),  # segments recombine
    "gpt_oss-experts-nonuniform": ("gpt_oss", [{"method": "reap", "ratio": 0.25},
                                               {"method": "heapr", "ratio": 0.5, "budget": "layer"}]),
    "mixtral-camera": ("mixtral", [{"method": "camera", "ratio": 0.5}]),
    "mixtral-experts": ("mixtral", [{"method": "frequency", "ratio": 0.25}]),
}



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_layered")
    write_words(root / "web.txt")
    (root / "short.txt").write_text("iota kappa alpha beta gamma delta epsilon zeta eta theta " * 2)
    for family in FAMILIES:
        save_tiny(family, root / family, seed=3, with_tokenizer=True)
    return root


@pytest.fixture(scope="module")
def exports(root):
    """case id -> honest export folder, made on first use by the in-memory `moeprune.prune` (verify not run)."""
    made = {}

    def get(case: str):
        if case not in made:
            family, recipe = CASES[case]
            calib = CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48)
            moeprune.prune(root / family, root / f"out-{case}", recipe=recipe, calib=calib, run_verify=False)
            made[case] = root / f"out-{case}"
        return made[case]

    return get


def _assert_same_figure(lazy, whole) -> None:
    """The layered run's logits comparison is the whole-model verify's, up to float summation order."""
    assert whole.passed, whole.line()
    assert lazy.passed, lazy.line()
    assert lazy.tokens == whole.tokens
    assert abs(lazy.max_abs_logit - whole.max_abs_logit) <= 1e-5 * whole.max_abs_logit
    assert abs(lazy.max_abs_diff - whole.max_abs_diff) <= whole.tolerance * whole.max_abs_logit
    assert lazy.max_abs_diff <= whole.tolerance * whole.max_abs_logit


@pytest.mark.parametrize("case", list(CASES))
def test_layered_passes_honest_exports_with_the_whole_model_figure(root, exports, case):
    family, _ = CASES[case]
    out = exports(case)
    whole = verify(root / family, out)
    lazy = verify(root / family, out, lazy=True)
    _assert_same_figure(lazy, whole)
    layers = load_model(root / family).config.get_text_config().num_hidden_layers
    assert len(lazy.layer_max_abs_diff) == len(lazy.layer_max_abs) == len(lazy.running_max_abs_diff) == layers
    assert lazy.failed_layers == [] and min(lazy.layer_max_abs) > 0.1  # non-degenerate block outputs
    assert all(r <= lazy.tolerance for r in lazy.layer_relative)
    d = lazy.to_dict()
    assert d["layer_max_abs_diff"] == lazy.layer_max_abs_diff and d["failed_layers"] == []
    assert whole.layer_max_abs_diff is None and "layer" not in whole.line()
    # the export is not the original: the per-layer references did real work (else this comparison would pass)
    original = load_model(root / family)
    exported = load_model(out)
    x = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(5))
    assert (original(x).logits - exported(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_layered_on_every_family(tmp_path, family):
    """A data-free expert removal on every supported family (shared experts, nested VL config, groups)."""
    src = save_tiny(family, tmp_path / "src", seed=1)
    out = api.apply_plan(src, api.make_plan(src, "aimer", 0.25), tmp_path / "out").out
    _assert_same_figure(verify(src, out, lazy=True), verify(src, out))


@pytest.mark.parametrize("family,layer", [("qwen3_moe", 1), ("deepseek_v3", 1), ("gpt_oss", 1), ("mixtral", 1)])
def test_layered_names_a_tampered_layer(root, exports, tmp_path, family, layer):
    case = next(c for c, (f, _) in CASES.items() if f == family)
    out = shutil.copytree(exports(case), tmp_path / "tampered")
    shard = next(f for f in sorted(out.glob("model*.safetensors")))
    tensors = load_file(shard)
    key = next(k for k in sorted(tensors) if f"layers.{layer}." in k and "experts" in k and tensors[k].dim() >= 2)
    t = tensors[key].clone()
    t[0] = t[0] * 3 + 0.1  # fused [E, ...]: expert 0's slice; per-expert keys: row 0 of that expert's matrix
    tensors[key] = t
    save_file(tensors, str(shard), metadata={"format": "pt"})

    whole = verify(root / family, out)
    lazy = verify(root / family, out, lazy=True)
    assert not whole.passed and not lazy.passed
    assert lazy.failed_layers == [layer], (key, lazy.layer_relative)
    assert all(r <= lazy.tolerance for i, r in enumerate(lazy.layer_relative) if i < layer)
    assert f"decoder layers [{layer}]" in lazy.line() and lazy.line().endswith("FAIL")
    assert abs(lazy.max_abs_diff - whole.max_abs_diff) <= 1e-4 * whole.max_abs_logit  # same final figure
    assert main(["verify", str(root / family), str(out), "--lazy"]) == 1
    assert main(["verify", str(root / family), str(exports(case)), "--lazy"]) == 0


@pytest.mark.parametrize("case", ["deepseek_v3-merge-neurons", "gpt_oss-dern", "qwen3_moe-experts-neurons"])
def test_one_layer_reference_equals_the_whole_model_reference_there_only(root, exports, case):
    family, _ = CASES[case]
    chain = read_chain(exports(case))
    original = load_model(root / family, dtype="float32")
    adapter = get_adapter(original.config, model=original)
    whole = Reference.of_chain(load_model(root / family, dtype="float32"), adapter, chain)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    prefix = next(n for n, m in original.named_modules() if m is adapter.decoder_layers(original))
    changed_somewhere = False
    for i in range(adapter.num_layers):
        one = Reference.of_chain(load_model(root / family, dtype="float32"), adapter, chain, layers=[i])
        assert one.masked() == ({i: whole.masked()[i]} if i in adapter.moe_layers() else {})
        ours, full = one.model.state_dict(), whole.model.state_dict()
        for k, v in ours.items():
            if k.startswith(f"{prefix}.{i}."):
                assert torch.equal(v, full[k]), (i, k)
                changed_somewhere |= not torch.equal(v, before[k])
            else:
                assert torch.equal(v, before[k]), (i, k)  # no other layer touched
    assert changed_somewhere  # merges and neuron stages write tensors


def test_tokens_and_calibration_sets(root, exports):
    """Real tokens in several chunks (one row padded): layered == whole-model verify on the same inputs."""
    family, out = "deepseek_v3", exports("deepseek_v3-merge-neurons")
    cfg = CalibConfig((CalibSource("web", root / "web.txt"), CalibSource("short", root / "short.txt")),
                      samples=3, seq_len=40, warn_short=False)
    sets = build_sets(cfg, tiny_tokenizer())
    assert any(int(s.attention_mask.min()) == 0 for s in sets)  # padding is exercised
    whole = verify(root / family, out, sets=sets, chunk=2)
    lazy = verify(root / family, out, sets=sets, chunk=2, lazy=True)
    assert whole.tokens == sum(s.tokens for s in sets)
    _assert_same_figure(lazy, whole)
    ids = sets[0].input_ids
    _assert_same_figure(verify(root / family, out, tokens=ids, lazy=True, chunk=2),
                        verify(root / family, out, tokens=ids))
    with pytest.raises(MoePruneError, match="outside the model's vocabulary"):
        verify(root / family, out, tokens=ids + 96, lazy=True)
    with pytest.raises(MoePruneError, match="not both"):
        verify(root / family, out, tokens=ids, sets=sets, lazy=True)


def _windows(root, rows: int):
    cfg = CalibConfig((CalibSource("web", root / "web.txt"), CalibSource("short", root / "short.txt")),
                      samples=3, seq_len=40, warn_short=False)
    return first_windows(build_sets(cfg, tiny_tokenizer()), rows)


@pytest.mark.parametrize("lazy", [False, True])
def test_real_windows_catch_a_token_the_seeded_ids_never_draw(root, exports, tmp_path, lazy):
    """The export's embedding row of one token that the calibration windows hold and the seeded ids do not is
    tampered (untied embeddings): verify on the seeded ids alone passes, verify with the windows besides fails."""
    family, out = "qwen3_moe", exports("qwen3_moe-experts")
    sets = _windows(root, 2)
    seeded = set(seeded_inputs(96, 2, 32, 0)["input_ids"].flatten().tolist())
    real = {t for s in sets for t in s.input_ids[s.attention_mask.bool()].tolist()}
    token = min(real - seeded)
    tampered = shutil.copytree(out, tmp_path / "tampered")
    key = "model.embed_tokens.weight"
    shard = next(f for f in sorted(tampered.glob("model*.safetensors")) if key in load_file(f))
    tensors = load_file(shard)
    tensors[key][token] *= 3
    save_file(tensors, str(shard), metadata={"format": "pt"})

    assert verify(root / family, tampered, lazy=lazy).passed  # the seeded ids never read that row
    both = verify(root / family, tampered, sets=sets, seeded=True, lazy=lazy)
    assert not both.passed, both.line()
    honest = verify(root / family, out, sets=sets, seeded=True, lazy=lazy)
    assert honest.passed, honest.line()
    window_tokens = sum(int(s.attention_mask[:2].sum()) for s in sets)
    seeded_tokens = verify(root / family, out, lazy=lazy).tokens
    assert honest.tokens == both.tokens == seeded_tokens + window_tokens
    assert honest.inputs.startswith(f"{2 + 2 * len(sets)} rows, {honest.tokens} tokens: random token ids (seed 0) "
                                    "and 2 windows each of web, short")


def test_prune_verifies_on_its_calibration_windows(root, tmp_path):
    """`prune`'s own verification runs on the seeded ids and the first windows of every calibration set, and its
    report says so."""
    calib = CalibrateOptions((f"web={root / 'web.txt'}", f"short={root / 'short.txt'}"), samples=3, seq_len=40)
    applied, result = moeprune.prune(root / "mixtral", tmp_path / "out", recipe=[{"method": "reap", "ratio": 0.25}],
                                     calib=calib)
    sets = _windows(root, VERIFY_WINDOWS)
    assert result.passed and "windows each of web, short" in result.inputs
    assert result.tokens == verify(root / "mixtral", applied.out).tokens + sum(s.tokens for s in sets)
    assert applied.report["verify"]["inputs"] == result.inputs


def test_one_layer_of_each_model_at_a_time(root, exports, monkeypatch):
    original_layer = LazyModel.layer
    open_now, seen, peak = [], [], [0]

    @contextmanager
    def layer(self, i):
        with original_layer(self, i) as module:
            open_now.append((id(self), i))
            seen.append((id(self), i))
            peak[0] = max(peak[0], len(open_now))
            try:
                yield module
            finally:
                open_now.remove((id(self), i))

    monkeypatch.setattr(LazyModel, "layer", layer)
    result = verify(root / "qwen3_moe", exports("qwen3_moe-experts-neurons"), lazy=True)
    assert result.passed and peak[0] == 1 and not open_now
    models = sorted({m for m, _ in seen})
    assert len(models) == 2 and all(sorted(i for m2, i in seen if m2 == m) == [0, 1, 2] for m in models)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA device")
def test_verify_on_a_missing_gpu_is_refused_before_loading(tmp_path, capsys):
    from moeprune.cli import main

    assert main(["verify", str(tmp_path / "a"), str(tmp_path / "b"), "--device", "cuda"]) == 2
    assert "no CUDA device is visible; use --device cpu" in capsys.readouterr().err

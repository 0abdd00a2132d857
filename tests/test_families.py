"""Every supported family, on tiny random models built from the real transformers configs:

- a keep-all plan reproduces the original logits exactly;
- masking nothing reproduces them too (the mask hook is inert when it should be);
- plan -> apply -> save -> stock `from_pretrained` equals the original with the removed experts masked
  (fp32, max |Δ| ≤ 1e-4 · max |logit|), while it clearly differs from the *unmasked* original;
- streaming apply writes tensors bit-identical to the in-memory path;
- config counts, module attributes and router shapes follow the plan.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from moeprune import api
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.stock import auto_class
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.pipeline.verify import logits_of, seeded_inputs
from moeprune.select.plan import PrunePlan
from moeprune.surgery.in_memory import apply_plan
from moeprune.tiny import FAMILY_CONFIGS, save_tiny

FAMILIES = sorted(FAMILY_CONFIGS)


def _load(path):
    """Stock `from_pretrained` of the stock Auto class (CausalLM; image-text-to-text for VL-MoEs)."""
    config = AutoConfig.from_pretrained(str(path))
    return auto_class(config).from_pretrained(str(path), dtype=torch.float32).eval()


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    """(family, original checkpoint, plan dropping 25%, in-memory output, streaming output)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    original = save_tiny(family, root / "original", seed=1)
    plan = api.make_plan(original, "aimer", 0.25)
    mem = api.apply_plan(original, plan, root / "mem").out
    stream = api.apply_plan(original, plan, root / "stream", streaming=True, max_shard_size="40KB").out
    return family, original, plan, mem, stream


@pytest.fixture(scope="module")
def inputs():
    return seeded_inputs(vocab_size=96, batch=2, seq_len=24, seed=3)


def test_keep_all_plan_reproduces_logits(family_ckpt, inputs):
    family, original, plan, _, _ = family_ckpt
    model = _load(original)
    want = logits_of(model, inputs)
    adapter = get_adapter(model.config)
    keep_all = PrunePlan({layer: list(range(plan.num_experts)) for layer in plan.layers}, plan.num_experts)
    with masked_experts(model, adapter, {layer: [] for layer in plan.layers}):
        assert torch.equal(logits_of(model, inputs), want)
    apply_plan(model, adapter, keep_all)
    got = logits_of(model, inputs)
    assert torch.equal(got, want), family
    assert want.abs().max() > 0.1  # not a degenerate all-zero model


def test_pruned_reload_equals_masked_original(family_ckpt, inputs):
    family, original, plan, mem, stream = family_ckpt
    model = _load(original)
    adapter = get_adapter(model.config)
    unmasked = logits_of(model, inputs)
    with masked_experts(model, adapter, {layer: plan.dropped(layer) for layer in plan.layers}) as hits:
        want = logits_of(model, inputs)
    assert all(c["hits"] >= 1 for c in hits.values()), hits
    keep = inputs["attention_mask"].bool()
    scale = want[keep].abs().max()
    for folder in (mem, stream):
        got = logits_of(_load(folder), inputs)
        diff = (got - want)[keep].abs().max()
        assert diff <= 1e-4 * scale, (family, folder.name, float(diff), float(scale))
        assert got.abs().max() > 0.1
    # removing experts must matter: the masked reference is far from the unmasked model
    assert (unmasked - want)[keep].abs().max() > 100 * 1e-4 * scale


def test_streaming_is_bit_identical_to_in_memory(family_ckpt):
    _, _, _, mem, stream = family_ckpt
    a, b = _tensors(mem), _tensors(stream)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert len(list(stream.glob("*.safetensors"))) > 1  # the small max_shard_size re-packed the shards
    index = json.loads((stream / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)


def test_counts_and_shapes_follow_the_plan(family_ckpt):
    family, original, plan, mem, _ = family_ckpt
    kept = plan.kept_count
    assert kept == 6
    model = _load(mem)
    adapter = get_adapter(model.config)
    assert adapter.num_experts == kept
    assert json.loads((mem / "config.json").read_text())["moeprune"]["num_experts_after"] == kept
    for layer in plan.layers:
        block = adapter.block(model, layer)
        router = adapter.router(block)
        assert router.weight.shape[0] == kept
        for name in adapter.count_attrs:
            for m in (block, router, adapter.experts(block)):
                if isinstance(getattr(m, name, None), int):
                    assert getattr(m, name) == kept, (family, name)
        for p in adapter.experts(block).parameters(recurse=False):
            assert p.shape[0] == kept
    report = json.loads((mem / "moeprune_report.json").read_text())
    assert report["kept_experts"] == {str(k): v for k, v in plan.kept_experts.items()}
    assert report["plan_sha256"] == plan.sha256()
    assert report["weight_bytes_after"] < report["weight_bytes_before"]


def test_kept_experts_carry_the_original_weights(family_ckpt):
    """Renumbering: new expert i of layer L is original expert kept[i], router rows included (brute force)."""
    family, original, plan, _, stream = family_ckpt
    src, dst = _load(original), _load(stream)
    adapter = get_adapter(src.config)
    for layer in plan.layers:
        kept = plan.kept_experts[layer]
        a, b = adapter.block(src, layer), adapter.block(dst, layer)
        for name, p in adapter.experts(a).named_parameters(recurse=False):
            q = dict(adapter.experts(b).named_parameters(recurse=False))[name]
            for new, old in enumerate(kept):
                assert torch.equal(q[new], p[old]), (family, name, layer)
        ra, rb = adapter.router(a), adapter.router(b)
        assert torch.equal(rb.weight, ra.weight[kept])
        for extra in ("bias", "e_score_correction_bias"):
            if getattr(ra, extra, None) is not None:
                assert torch.equal(getattr(rb, extra), getattr(ra, extra)[kept]), extra


def test_input_checkpoint_untouched(family_ckpt, tmp_path):
    _, original, _, _, _ = family_ckpt
    before = {f.name: f.read_bytes() for f in original.iterdir()}
    api.prune(original, tmp_path / "out", method="weight_norm", ratio=0.5, streaming=True)
    assert {f.name: f.read_bytes() for f in original.iterdir()} == before
    assert Checkpoint.open(tmp_path / "out").total_bytes < Checkpoint.open(original).total_bytes


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_bf16_sharded_input_with_tokenizer(family, tmp_path):
    """dtype is preserved, sharded inputs work, tokenizer + generation config travel, both paths agree."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    original = save_tiny(family, tmp_path / "original", seed=5, dtype=torch.bfloat16, max_shard_size="60KB")
    assert len(list(original.glob("*.safetensors"))) > 1
    vocab = {f"w{i}": i for i in range(96)} | {"<unk>": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(original)
    GenerationConfig(max_new_tokens=7, do_sample=False).save_pretrained(original)
    plan = api.make_plan(original, "weight_norm", 0.5)
    mem = api.apply_plan(original, plan, tmp_path / "mem").out
    stream = api.apply_plan(original, plan, tmp_path / "stream", streaming=True).out
    a, b = _tensors(mem), _tensors(stream)
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    src = _tensors(original)
    assert {t.dtype for t in a.values()} == {t.dtype for t in src.values()}  # dtypes preserved
    assert sum(t.dtype == torch.bfloat16 for t in a.values()) > len(a) // 2
    for folder in (mem, stream):
        assert AutoTokenizer.from_pretrained(str(folder))("w3 w5")["input_ids"] == [3, 5]
        assert GenerationConfig.from_pretrained(str(folder)).max_new_tokens == 7
        assert api.verify(original, folder).passed

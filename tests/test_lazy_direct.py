"""Fused experts read straight into place (`io/lazy_direct.py`) equal what transformers' own converters build
(the same lazy loader with the direct read turned off, and `from_pretrained`), and the direct read is really taken
where it applies and left to transformers where it does not."""

from __future__ import annotations

import pytest
import torch

import moeprune.io.lazy as lazy_mod
from moeprune.io.lazy import load_lazy
from moeprune.io.lazy_direct import plan_direct
from moeprune.io.load import load_model
from moeprune.io.safetensors_io import TensorEntry
from moeprune.models import get_adapter
from moeprune.tiny import save_tiny

EXPERT_KEY = (".experts.",)  # per-expert checkpoint keys of the families below


def _layers_through(lazy, monkeypatch) -> tuple[list[dict], list[str]]:
    """Every decoder layer's state dict (cloned), and the checkpoint keys transformers' loader was given."""
    given: list[str] = []
    real = lazy_mod.load_keys

    def spy(lz, keys, scope, **kw):
        given.extend(keys)
        return real(lz, keys, scope, **kw)

    monkeypatch.setattr(lazy_mod, "load_keys", spy)
    out = []
    for i in range(len(lazy.layers)):
        with lazy.layer(i) as layer:
            out.append({k: v.clone() for k, v in layer.state_dict().items()})
    monkeypatch.setattr(lazy_mod, "load_keys", real)
    return out, given


@pytest.mark.parametrize("family, experts", [("qwen3_moe", "num_experts"), ("mixtral", "num_local_experts"),
                                             ("deepseek_v3", "n_routed_experts")])
@pytest.mark.parametrize("dtype, load", [(torch.bfloat16, "auto"), (torch.bfloat16, "float32"),
                                         (torch.float32, "bfloat16")], ids=["bf16", "bf16-narrow", "f32-cast"])
def test_direct_read_equals_transformers(family, experts, dtype, load, tmp_path, monkeypatch):
    """12 experts, so expert 10 sorts after expert 9 only in natural order (a plain string sort would swap them);
    small shards, so one layer's experts come from several files. f32-cast: the sources need a cast, so the
    direct read must step aside and transformers converts them."""
    path = save_tiny(family, tmp_path / "m", dtype=dtype, max_shard_size="60KB", **{experts: 12})
    direct = load_lazy(path, load)
    assert direct.direct, "no fused parameter was planned for a direct read"
    got, given = _layers_through(direct, monkeypatch)
    plain = load_lazy(path, load)
    plain.direct = {}  # transformers' converters for everything: the reference
    want, _ = _layers_through(plain, monkeypatch)
    eager = get_adapter(load_model(path, load).config)
    eager_layers = eager.decoder_layers(load_model(path, load))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys()
        for k in g:
            assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), (i, k)
            assert torch.equal(g[k], eager_layers[i].state_dict()[k]), (i, k)
    expert_keys = [k for k in given if any(s in k for s in EXPERT_KEY)]
    if load == "bfloat16":
        assert expert_keys, "a cast was needed, but the experts did not go through transformers"
    else:
        assert not expert_keys, f"read through transformers although the direct read applies: {expert_keys[:3]}"


def _entry(name: str, shape: tuple[int, ...]) -> TensorEntry:
    return TensorEntry(name, "x.safetensors", "BF16", shape, 0, 2 * int(torch.Size(shape).numel()))


def test_plan_refuses_what_it_cannot_place():
    from moeprune.compat import Concatenate, MergeModulelist, WeightConverter

    conv = WeightConverter(["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                           "mlp.experts.gate_up_proj", operations=[MergeModulelist(dim=0), Concatenate(dim=1)])
    g, u = conv.source_patterns

    def sources(n_gate=3, n_up=3, up_shape=(4, 5)):
        return ([(g, f"l.mlp.experts.{j}.gate_proj.weight", _entry("g", (4, 5))) for j in range(n_gate)]
                + [(u, f"l.mlp.experts.{j}.up_proj.weight", _entry("u", up_shape)) for j in range(n_up)])

    pieces = plan_direct(conv, sources(), (3, 8, 5), {}, "t")
    assert [(p.expert, p.offset, p.rows) for p in pieces] == [(0, 0, 4), (1, 0, 4), (2, 0, 4),
                                                              (0, 4, 4), (1, 4, 4), (2, 4, 4)]
    assert plan_direct(conv, sources(), (3, 8, 6), {}, "t") is None  # does not fill the parameter's shape
    assert plan_direct(conv, sources(n_up=2), (3, 8, 5), {}, "t") is None  # an expert missing
    assert plan_direct(conv, sources(up_shape=(4, 6)), (3, 8, 5), {}, "t") is None  # columns disagree
    assert plan_direct(conv, sources(), (3, 8, 5), {"mlp.experts.*": torch.float32}, "mlp.experts.x") is None
    viewed = [(p, k, object()) for p, k, _ in sources()]  # a view's tensors (read()), not file entries
    assert plan_direct(conv, viewed, (3, 8, 5), {}, "t") is None
    transposed = WeightConverter(["mlp.experts.*.gate_proj.weight"], "mlp.experts.gate_proj",
                                 operations=[MergeModulelist(dim=1)])
    assert plan_direct(transposed, sources(n_up=0), (4, 3, 5), {}, "t") is None

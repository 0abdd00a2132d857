"""Routing kinds of the structural families, checked router by router against a brute-force reference.

- the masked reference (`masking.masked_experts`, each of the kind's `masked_ops` masked on every call) gives the
  routing of the stock router built with E' = K experts from the kept rows of every expert-indexed tensor
  (weight [E, H], correction bias [E] or [1, E]), sliced here by plain indexing;
- a masked op that a router never computes is reported;
- the routing kind is read from code, not comments; a FamilySpec can pick it from a config value;
- streaming apply slices [1, ..., 1, E] tensors by bytes exactly as indexing their last axis does;
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from moeprune.errors import MoePruneError
from moeprune.io.safetensors_io import read_header, write_file
from moeprune.models import get_adapter
from moeprune.models.base import shape_expert_axis
from moeprune.models.families import FamilySpec
from moeprune.models.masking import masked_experts
from moeprune.models.routing import MASKED_OPS, ROUTING_KINDS, RoutingSpec
from moeprune.models.structural import _code
from moeprune.surgery.streaming import _rows

E, K_TOP, H = 8, 2, 32
SIZES = dict(hidden_size=H, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, vocab_size=96, num_hidden_layers=2)
COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _config(model_type: str, **extra):
    base = AutoConfig.for_model(model_type)
    kw = {k: v for k, v in SIZES.items() if getattr(base, k, None) is not None}
    kw.update({k: E for k in COUNTS if isinstance(getattr(base, k, None), int)})
    kw.update(num_experts_per_tok=K_TOP, **extra)
    return AutoConfig.for_model(model_type, **kw)


class _RouterOnly:
    """An adapter view whose 'model' is one router: what `masked_experts` needs."""

    def __init__(self, adapter, router: nn.Module):
        self.num_experts, self._routing, self._router = adapter.num_experts, adapter.routing(), router

    def routing(self):
        return self._routing

    def block(self, model, layer):
        return model

    def router(self, block):
        return self._router


def _routers(model_type: str, **extra):
    """(adapter, router with random weights and correction bias, router class)."""
    config = _config(model_type, **extra)
    adapter = get_adapter(config)
    s = adapter.structure
    block = s.meta.get_submodule(s.layers_path)[s.moe_layers[0]].get_submodule(s.block_name)
    cls = type(getattr(block, s.router_name))
    torch.manual_seed(0)
    router = cls(adapter.config).float()
    with torch.no_grad():
        for t in [*router.parameters(), *router.buffers()]:
            if t.dim() == 2 and t.shape[0] == E:
                t.normal_(0, 4.0 / H ** 0.5)  # weight [E, H]
            elif t.shape[-1] == E:
                t.normal_(0, 0.05)  # correction bias [E] / [1, E]: of the order of score gaps
    return adapter, router, cls


def _pruned(router: nn.Module, cls: type, adapter, kept: list[int]) -> nn.Module:
    """The stock router of K experts holding the kept rows (brute force: indexing every expert axis)."""
    small = copy.deepcopy(adapter.config)
    setattr(small, adapter.count_key, len(kept))
    out = cls(small).float()
    idx = torch.tensor(kept)
    with torch.no_grad():
        for t, o in zip([*router.parameters(), *router.buffers()], [*out.parameters(), *out.buffers()],
                        strict=True):
            if t.shape and t.shape[0] == E:
                o.copy_(t[idx])
            elif t.dim() and t.shape[-1] == E:
                o.copy_(t[..., idx])
            else:
                o.copy_(t)
    return out


def _dense(weights: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """[T, k] weights at [T, k] expert indices -> [T, width] (0 where not routed)."""
    return torch.zeros(weights.shape[0], width, dtype=torch.float64).scatter_(1, index, weights.double())


CASES = [  # model type, config extras, expected kind
    ("ernie4_5_moe", {}, "softmax_bias"),
    ("kolibri1", {}, "sigmoid_topk"),
    ("laguna", {}, "sigmoid_grouped"),
    ("minimax_m3_vl_text", {}, "sigmoid_grouped"),
    ("cohere2_moe", {"expert_selection_fn": "softmax"}, "topk_softmax"),
    ("cohere2_moe", {"expert_selection_fn": "sigmoid"}, "sigmoid_topk"),
]


@pytest.mark.parametrize(("model_type", "extra", "kind"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_masked_router_equals_pruned_router(model_type, extra, kind):
    adapter, router, cls = _routers(model_type, **extra)
    assert adapter.routing().kind == kind
    dropped = [1, 4, 6]
    kept = [j for j in range(E) if j not in dropped]
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = router(x)
        with masked_experts(router, _RouterOnly(adapter, router), {0: dropped}) as hits:
            masked = router(x)
        small = _pruned(router, cls, adapter, kept)(x)
    assert hits[0]["calls"] == 1 and hits[0]["hits"] == 1
    assert all(n == 1 for n in hits[0]["ops"].values()) and tuple(hits[0]["ops"]) == MASKED_OPS[kind]
    want = _dense(small[1], torch.tensor(kept)[small[2]], E)  # pruned indices -> original expert ids
    got = _dense(masked[1], masked[2], E)
    assert got[:, dropped].abs().max() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert (_dense(plain[1], plain[2], E) - want).abs().max() > 1e-3  # dropping changed the routing


def test_softmax_bias_needs_both_masks():
    """ERNIE selects by softmax + bias. Masking only the softmax output keeps the softmax's normaliser over all E
    experts, which shifts p against the bias and changes selections; masking only the logits gives a removed
    expert p = 0, which a positive bias lifts into the top-k."""
    adapter, router, cls = _routers("ernie4_5_moe")
    with torch.no_grad():
        router.moe_statics.e_score_correction_bias.data[0, 0] = 5.0  # expert 0 (removed) wins any top-k it is in
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(2))
    view = _RouterOnly(adapter, router)
    for ops in (("linear",), ("softmax",)):
        view._routing = _SpecWithOps(adapter.routing(), ops)
        with torch.no_grad(), masked_experts(router, view, {0: [0, 3]}):
            _, w, idx = router(x)
        small = _pruned(router, cls, adapter, [1, 2, 4, 5, 6, 7])(x)
        want = _dense(small[1], torch.tensor([1, 2, 4, 5, 6, 7])[small[2]], E)
        assert (_dense(w, idx, E) - want).abs().max() > 1e-3, ops


class _SpecWithOps:
    def __init__(self, spec: RoutingSpec, ops: tuple[str, ...]):
        self.masked_ops, self.kind = ops, spec.kind


def test_unseen_masked_op_is_reported():
    adapter, router, _ = _routers("ernie4_5_moe")
    linear_only = nn.Linear(H, E, bias=False)  # no softmax in this "router"
    with pytest.raises(MoePruneError, match="'softmax'"):
        with masked_experts(linear_only, _RouterOnly(adapter, linear_only), {0: [1]}):
            linear_only(torch.randn(4, H))


def test_every_kind_has_masked_ops():
    assert set(MASKED_OPS) == set(ROUTING_KINDS)
    assert RoutingSpec("softmax_bias", 2).masked_ops == ("linear", "softmax")


def test_code_ignores_comments_and_docstrings():
    class Router(nn.Module):
        """Uses no softmax at all."""

        def forward(self, x):
            # sigmoid instead of softmax normalisation
            return torch.sigmoid(x)

    code = _code(Router)
    assert "sigmoid" in code and "softmax" not in code


def test_family_spec_routing_by_config_value():
    spec = FamilySpec("x", ("x",), routing_key="fn", routing_by=(("a", "sigmoid_topk"), ("b", "topk_softmax")))
    assert spec.routing_kind(type("C", (), {"fn": "b"})()) == "topk_softmax"
    with pytest.raises(MoePruneError, match="fn='c'"):
        spec.routing_kind(type("C", (), {"fn": "c"})())
    assert FamilySpec("y", ("y",), routing="softmax_bias").routing_kind(object()) == "softmax_bias"


@pytest.mark.parametrize("shape", [(E, 5), (E,), (1, E), (1, 1, E)])
def test_streaming_rows_follow_the_experts_axis(tmp_path, shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    save_file({"pad": torch.zeros(3), "t": t}, str(tmp_path / "in.safetensors"))  # "pad": t starts mid-file
    entry = next(e for e in read_header(tmp_path / "in.safetensors")[0] if e.name == "t")
    kept = [0, 2, 3, 7]
    write_file(tmp_path / "out.safetensors", [_rows(entry, kept, E)])
    got = load_file(str(tmp_path / "out.safetensors"))["t"]
    axis = shape_expert_axis(shape, E)
    want = t.index_select(axis, torch.tensor(kept))
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_shape_expert_axis():
    assert shape_expert_axis((E, 3), E) == 0 and shape_expert_axis((1, E), E) == 1
    assert shape_expert_axis((2, E), E) is None and shape_expert_axis((), E) is None

"""A weights plan's tensors digest (`WeightsPlan.tensors_sha256`) against a by-hand sha256, and its memo: saving a
plan, its provenance and its report hash the tensors once, and any change to them (in place, a replaced tensor, a
rewritten store file) gives a fresh digest."""

from __future__ import annotations

import hashlib
import os

import torch

from moeprune.stages.weights_plan import WeightsPlan
from moeprune.stages.weights_store import SpilledLayers


def by_hand(named: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def counting(monkeypatch) -> list[int]:
    calls = [0]
    named = WeightsPlan.named

    def spy(self):
        calls[0] += 1
        yield from named(self)

    monkeypatch.setattr(WeightsPlan, "named", spy)
    return calls


def test_in_memory_digest_is_remembered_until_a_tensor_changes(monkeypatch):
    calls = counting(monkeypatch)
    g = torch.Generator().manual_seed(0)
    up, router = torch.randn(6, 5, generator=g).to(torch.bfloat16), torch.randn(4, 5, generator=g)
    plan = WeightsPlan("repair", 4, 6, {1: {0: {"up": up}}}, {1: {"weight": router}})
    want = lambda: by_hand({"layer.1.expert.0.up": plan.experts[1][0]["up"],  # noqa: E731
                            "layer.1.router.weight": plan.router[1]["weight"]})
    assert plan.tensors_sha256() == want() and plan.tensors_sha256() == want() and calls[0] == 1
    up.add_(1)  # in place
    assert plan.tensors_sha256() == want() and calls[0] == 2
    plan.router[1]["weight"] = router.clone()  # the same values in a new tensor: hashed again, same digest
    before = plan.tensors_sha256()
    assert calls[0] == 3 and before == want()
    plan.experts[1][0]["up"] = up * 2  # replaced
    assert plan.tensors_sha256() == want() != before and calls[0] == 4


def test_a_stored_plan_is_hashed_once_for_save_provenance_and_report(tmp_path, monkeypatch):
    from moeprune.stages.sparsity import SPARSITY

    g = torch.Generator().manual_seed(1)
    values = {layer: {i: {"down": torch.randn(5, 6, generator=g)} for i in (0, 3)} for layer in (0, 2)}
    store = SpilledLayers(tmp_path)
    for layer, experts in values.items():
        store[layer] = experts
    plan = WeightsPlan("wanda", 4, 6, store)
    calls = counting(monkeypatch)
    saved = plan.save(tmp_path / "1-sparsity.json")
    SPARSITY.provenance(plan)
    plan.sha256()
    assert calls[0] == 1
    want = by_hand({f"layer.{layer}.expert.{i}.down": roles["down"] for layer, ex in values.items()
                    for i, roles in ex.items()})
    assert plan.tensors_sha256() == want and want in saved.read_text()
    # a store file rewritten in place (same size): its mtime changes, so the digest is made again
    entry = store.entries(2)[(3, "down")]
    with open(entry.file, "r+b") as f:
        f.seek(entry.begin)
        f.write(torch.zeros(5, 6).numpy().tobytes())
    st = os.stat(entry.file)
    os.utime(entry.file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    values[2][3]["down"] = torch.zeros(5, 6)
    changed = by_hand({f"layer.{layer}.expert.{i}.down": roles["down"] for layer, ex in values.items()
                       for i, roles in ex.items()})
    assert plan.tensors_sha256() == changed != want and calls[0] == 2


def test_a_plan_of_keep_masks_refuses_router_tensors_and_bias_roles():
    """`WeightsPlan.validate`: keep masks apply to the weight matrices only (gate, up, down)."""
    import pytest

    from moeprune.errors import MoePruneError
    from moeprune.models import get_adapter
    from moeprune.tiny import tiny_model

    model = tiny_model("qwen3_moe", seed=0)
    adapter = get_adapter(model.config, model=model)
    E, I, layer = adapter.num_experts, adapter.expert_width, adapter.moe_layers()[0]
    bits = torch.zeros(I, 1, dtype=torch.uint8)
    WeightsPlan("wanda", E, I, {layer: {0: {"gate": bits}}}, masks=True).validate(adapter)  # accepted
    with pytest.raises(MoePruneError, match="unknown roles"):
        WeightsPlan("wanda", E, I, {layer: {0: {"gate_bias": bits}}}, masks=True).validate(adapter)
    with pytest.raises(MoePruneError, match="changes no router tensor"):
        WeightsPlan("wanda", E, I, {}, {layer: {"weight": torch.zeros(E, 4)}}, masks=True).validate(adapter)

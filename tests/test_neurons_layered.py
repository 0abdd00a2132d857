"""Layer-by-layer neuron statistics (`stats/neurons_layered.py`) against the whole-model in-memory pass.

Reference: `collect_neuron_stats` on the stock `load_model` copy of the same checkpoint (one forward, and one
backward through the whole model for HEAPr). Every family, float32. Tolerance rtol 1e-5 / atol 1e-9 on every
float64 sum (the two schedules run the same float32 ops, per layer instead of per model); counts exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moeprune.calibration.data import CalibSet
from moeprune.criteria.neurons import neuron_scores
from moeprune.errors import MoePruneError
from moeprune.io.lazy import load_lazy
from moeprune.io.load import load_model
from moeprune.models import get_adapter
from moeprune.select.neurons import select_neurons
from moeprune.stats import neurons_cache
from moeprune.stats.neurons import FIELDS, collect_neuron_stats
from moeprune.stats.neurons_layered import collect_neuron_stats_layered, neuron_stats
from moeprune.tiny import FAMILY_CONFIGS, save_tiny

FAMILIES = sorted(FAMILY_CONFIGS)
BATCH = 2  # 5 windows in set "a", 3 in "b": partial batches too
TOL = dict(rtol=1e-5, atol=1e-9)


def _set(name: str, seed: int, rows: int, S: int = 20) -> CalibSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (rows, S), generator=g)
    mask = torch.ones(rows, S, dtype=torch.long)
    mask[1, -6:] = 0  # right padding: never counted
    return CalibSet(name, ids, mask, sha256="0" * 64, source="test", documents=rows, stream_tokens=int(mask.sum()))


SETS = [_set("a", 0, 5), _set("b", 1, 3)]  # S = 20 > gpt-oss sliding window 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("neurons_layered")
    return {f: save_tiny(f, root / f, seed=7, max_shard_size="40KB") for f in FAMILIES}


def _in_memory(path, gradients: bool):
    model = load_model(path, dtype="float32")
    return collect_neuron_stats(model, get_adapter(model.config, model=model), SETS, gradients=gradients,
                                batch_size=BATCH)


def _assert_same_stats(got, want, gradients: bool) -> None:
    assert got.keys() == want.keys()
    for layer, w in want.items():
        g = got[layer]
        assert g.sums.keys() == w.sums.keys()
        for name in FIELDS + ("count", "grad_count"):
            if name in ("count", "grad_count"):
                assert torch.equal(g.sums[name], w.sums[name]), (layer, name)
            else:
                torch.testing.assert_close(g.sums[name], w.sums[name], **TOL, msg=f"layer {layer} {name}")
        assert w.sums["count"].sum() > 0 and w.sums["act_sq"].abs().max() > 0  # not a comparison of zeros
        if gradients:
            assert w.sums["grad_sq"].abs().max() > 0
            assert torch.equal(w.sums["grad_count"], w.sums["count"])
        else:
            assert w.sums["grad_sq"].abs().max() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_camera_layered_equals_in_memory(family, checkpoints):
    got = collect_neuron_stats_layered(checkpoints[family], SETS, gradients=False, batch_size=BATCH)
    _assert_same_stats(got, _in_memory(checkpoints[family], gradients=False), gradients=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_heapr_layered_equals_in_memory(family, checkpoints):
    got = collect_neuron_stats_layered(checkpoints[family], SETS, gradients=True, batch_size=BATCH)
    want = _in_memory(checkpoints[family], gradients=True)
    _assert_same_stats(got, want, gradients=True)
    # and the plans built from them (scores -> selection) are identical
    for method, params in (("heapr", {}), ("camera", {"rho": 0.9})):
        s_got, s_want = neuron_scores(method, got, **params), neuron_scores(method, want, **params)
        for budget in ("expert", "global"):
            assert select_neurons(s_got, 0.5, budget, 1, align=8) == select_neurons(s_want, 0.5, budget, 1, align=8)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_disk_spill_equals_memory_cache(family, checkpoints, monkeypatch):
    written = []
    save = neurons_cache.save_file
    monkeypatch.setattr(neurons_cache, "save_file", lambda tensors, path: (written.append(path), save(tensors, path)))
    in_memory = collect_neuron_stats_layered(checkpoints[family], SETS, gradients=True, batch_size=BATCH,
                                             cache_budget_bytes=1 << 40)
    assert written == []
    spilled = collect_neuron_stats_layered(checkpoints[family], SETS, gradients=True, batch_size=BATCH,
                                           cache_budget_bytes=0)
    moe = get_adapter(load_lazy(checkpoints[family]).model.config).moe_layers()
    n_layers = FAMILY_CONFIGS[family]["num_hidden_layers"]
    assert len(written) == n_layers - moe[0]  # every cached boundary went to disk ...
    assert not any(Path(p).parent.exists() for p in written)  # ... and the folder is gone
    for layer, s in in_memory.items():
        for name, v in s.sums.items():
            assert torch.equal(spilled[layer].sums[name], v), (layer, name)


def test_layer_context_sees_every_materialisation(checkpoints):
    """A caller's layer_context replaces `LazyModel.layer`: here it also scales the first MoE layer's experts, and
    the statistics are those of the in-memory model with the same change (earlier recipe stages work this way)."""
    path = checkpoints["qwen3_moe"]  # layers 0 (dense), 1, 2 (MoE)
    lazy = load_lazy(path, dtype="float32", head=True)
    adapter = get_adapter(lazy.model.config, model=lazy.model)
    entered = []

    def scale(model) -> None:
        adapter.experts(adapter.block(model, 1)).down_proj.data.mul_(0.5)

    @contextmanager
    def context(i):
        entered.append(i)
        with lazy.layer(i) as layer:
            if i == 1:
                scale(lazy.model)
            yield layer

    got = collect_neuron_stats_layered(lazy, SETS, gradients=True, batch_size=BATCH, layer_context=context)
    assert entered == [0, 1, 2, 2, 1]  # up through every layer, down to the first MoE layer
    model = load_model(path, dtype="float32")
    scale(model)
    want = collect_neuron_stats(model, get_adapter(model.config, model=model), SETS, gradients=True,
                                batch_size=BATCH)
    _assert_same_stats(got, want, gradients=True)
    plain = collect_neuron_stats_layered(path, SETS, gradients=True, batch_size=BATCH)
    assert not torch.allclose(plain[1].sums["down_sq"], got[1].sums["down_sq"])  # the change was seen


def test_refusals_before_work(checkpoints, monkeypatch):
    from moeprune.stats import neurons_layered

    monkeypatch.setattr(neurons_layered, "capture", lambda *a, **k: pytest.fail("capture ran before the refusal"))
    path = checkpoints["qwen3_moe"]
    with pytest.raises(MoePruneError, match="head=True"):
        collect_neuron_stats_layered(load_lazy(path), SETS, gradients=True, batch_size=BATCH)
    with pytest.raises(MoePruneError, match="cache_budget_bytes"):
        collect_neuron_stats_layered(path, SETS, gradients=True, batch_size=BATCH, cache_budget_bytes=-1)
    with pytest.raises(MoePruneError, match="batch_size"):
        collect_neuron_stats_layered(path, SETS, gradients=False, batch_size=0)
    with pytest.raises(MoePruneError, match="dtype"):
        collect_neuron_stats_layered(path, SETS, gradients=False, batch_size=BATCH, dtype="float8")
    from test_modulelist_generic import legacy_model  # MoE blocks with a ModuleList of expert MLPs

    with pytest.raises(MoePruneError, match="fused 3-D or flat experts"):
        collect_neuron_stats_layered(legacy_model(), SETS, gradients=False, batch_size=BATCH)
    ctx = SimpleNamespace(ckpt=SimpleNamespace(path=path), calib=SimpleNamespace(batch_size=BATCH, device="cpu"),
                          sets=SETS, previous=[("stage", "plan")])
    with pytest.raises(MoePruneError, match="layer_context"):
        neuron_stats(ctx, gradients=True)


def test_stage_entry_point(checkpoints):
    path = checkpoints["mixtral"]
    ctx = SimpleNamespace(ckpt=SimpleNamespace(path=path), calib=SimpleNamespace(batch_size=BATCH, device="cpu"),
                          sets=SETS, previous=[])
    _assert_same_stats(neuron_stats(ctx, gradients=True), _in_memory(path, gradients=True), gradients=True)


def test_in_memory_module_input(checkpoints):
    """An in-memory model is accepted too (no lazy loading): same statistics as the whole-model pass."""
    path = checkpoints["deepseek_v3"]
    model = load_model(path, dtype="float32")
    got = collect_neuron_stats_layered(model, SETS, gradients=True, batch_size=BATCH)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    _assert_same_stats(got, _in_memory(path, gradients=True), gradients=True)


@pytest.mark.parametrize("family,over", [("cohere2_moe", {}), ("granitemoe", {"logits_scaling": 4.0})])
def test_heapr_layered_keeps_the_models_logit_post_processing(family, over, tmp_path):
    """Cohere2-MoE scales its logits by 0.0625, Granite-MoE divides them: the layer-by-layer gradients go through the
    model's own head code, as the whole-model backward does."""
    from moeprune.tiny_families import tiny_family_model

    tiny_family_model(family, seed=7, **over).save_pretrained(tmp_path / family)
    got = collect_neuron_stats_layered(tmp_path / family, SETS, gradients=True, batch_size=BATCH)
    _assert_same_stats(got, _in_memory(tmp_path / family, gradients=True), gradients=True)

"""MC-SMoE's compress stage after a merge: `{method: compress, rank: 16, sparsity: 0.9}` (`merge/compress.py`).

    for every merged expert (a group of two or more; `experts: all` for every expert) and role gate / up / down:
        W ≈ L + S, L of rank `rank`, S keeping the (1 − sparsity) largest residual entries (`iterations` rounds)
    plan = a WeightsPlan holding L + S (dense; biases untouched)

It must follow a merge stage (`merge`); the plan's summary gives, per layer and role, the relative reconstruction
error ‖W − L − S‖_F/‖W‖_F and the bytes the factorised form would take (`factorised_bytes`) against the dense bytes.
The export is dense (stock families hold no factorised experts), so it saves no bytes on disk by itself: the
factorised bytes are what a serving format with factors would store (docs/sparsity.md). With `--lazy` the merged
layers are visited one at a time and the new tensors wait on disk (`stages/weights_store.py`); when compress is the
recipe's last stage, each visited layer is written to the export then (`pipeline/fused.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.merge.compress import factorised_bytes, low_rank_sparse, squared_norms
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.stages.base import Need, register_stage
from moeprune.stages.weights import StoredDtypes, WeightOptions, WeightStage
from moeprune.stages.weights_plan import WeightsPlan, weights_format
from moeprune.stages.weights_store import SpilledLayers

ROLES = ("gate", "up", "down")
WHICH = ("merged", "all")


@dataclass(frozen=True)
class CompressOptions(WeightOptions):
    rank: int | None = None  # required: the rank of L per matrix
    sparsity: float = 0.9  # share of S's entries that are zero
    iterations: int = 1  # alternating rounds (1: SVD, then threshold the residual)
    experts: str = "merged"  # merged (groups of two or more) or all


class CompressStage(WeightStage):
    kind = "compress"
    plan_format = weights_format("compress")
    options_type = CompressOptions

    @classmethod
    def methods(cls) -> list[str]:
        return ["compress"]

    def validate_options(self, o: CompressOptions) -> None:
        if o.rank is None or isinstance(o.rank, bool) or not isinstance(o.rank, int) or o.rank < 1:
            raise MoePruneError(f"rank {o.rank!r}: give the rank of the low-rank part, an integer >= 1 (e.g. rank: "
                                "16).")
        s = o.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1:
            raise MoePruneError(f"sparsity {s!r}: the share of the sparse part's entries that are zero, in [0, 1].")
        if isinstance(o.iterations, bool) or not isinstance(o.iterations, int) or o.iterations < 1:
            raise MoePruneError(f"iterations {o.iterations!r}: an integer >= 1.")
        if o.experts not in WHICH:
            raise MoePruneError(f"experts {o.experts!r}: choose {' or '.join(WHICH)}.")

    def needs(self, o: CompressOptions) -> set[Need]:
        return set()

    def check_previous(self, o: CompressOptions, previous: list) -> None:
        if not previous or previous[-1].stage.kind != "merge":
            what = "nothing" if not previous else f"{previous[-1].where}, a {previous[-1].stage.kind} stage"
            raise MoePruneError(f"compress decomposes the experts a merge made (MC-SMoE); here it follows {what}. "
                                "Put it right after a merge stage (e.g. method msmoe).")

    def plans_per_layer(self, o: CompressOptions) -> bool:
        return True  # a layer's fits are final when its visit ends (the lazy export is then written in it)

    def plan(self, o: CompressOptions, ctx) -> WeightsPlan:
        _, merge_plan = ctx.previous[-1]
        view = ctx.layer_view()  # with --lazy: one decoder layer (merged by the earlier plans) in memory at a time
        model = view.model
        adapter = get_adapter(model.config, model=model)
        experts: dict | SpilledLayers = SpilledLayers() if ctx.lazy else {}  # lazy: each layer's tensors on disk
        stored = StoredDtypes(ctx.ckpt, adapter)
        layers: dict[str, dict] = {}
        moe = adapter.moe_layers()
        with torch.no_grad():
            for n, layer in enumerate(bar := tqdm(moe, leave=False)):
                bar.set_description(f"compress (layer {n + 1}/{len(moe)})")
                groups = merge_plan.groups.get(layer, [])
                chosen = [g for g, members in enumerate(groups) if o.experts == "all" or len(members) > 1]
                err = {r: [0.0, 0.0] for r in ROLES}  # role -> [Σ‖W − L − S‖², Σ‖W‖²]
                dense = fact = 0
                new_layer: dict[int, dict[str, torch.Tensor]] = {}
                with view.layer(layer):
                    block = adapter.block(model, layer)
                    for g in chosen:
                        views = adapter.expert_views(block, g)
                        for role in ROLES:
                            if role not in views:
                                continue
                            w = views[role].detach()
                            low, sparse = low_rank_sparse(w, o.rank, o.sparsity, o.iterations)
                            fit = low.add_(sparse)  # [m, n] float64 L + S (low is not read again)
                            new_layer.setdefault(g, {})[role] = stored.expert(layer, role, fit.to(
                                w.dtype).cpu())  # in its stored dtype at once
                            for k, v in enumerate(squared_norms(w, fit)):  # ‖W − L − S‖², ‖W‖²
                                err[role][k] += v
                            dense += w.numel() * w.element_size()
                            fact += factorised_bytes(tuple(w.shape), o.rank, o.sparsity, w.element_size())
                    ctx.layer_planned(view, layer, lambda m=model, n=layer, new=new_layer: self.apply_layer(
                        m, adapter, WeightsPlan("compress", adapter.num_experts, adapter.expert_width, {n: new}), n))
                if new_layer:
                    experts[layer] = new_layer
                layers[str(layer)] = {"experts": chosen, "dense_bytes": dense, "factorised_bytes": fact,
                                      "rel_error": {r: (e[0] / e[1]) ** 0.5 if e[1] else 0.0 for r, e in err.items()
                                                    if e[1]}}
        del view, model
        dense = sum(v["dense_bytes"] for v in layers.values())
        fact = sum(v["factorised_bytes"] for v in layers.values())
        logger.info("compress: %d experts decomposed; factorised %.1f%% of their dense bytes",
                    sum(len(v["experts"]) for v in layers.values()), 100 * fact / dense if dense else 0)
        return WeightsPlan("compress", adapter.num_experts, adapter.expert_width, experts, {},
                           settings={"rank": o.rank, "sparsity": o.sparsity, "iterations": o.iterations,
                                     "experts": o.experts},
                           summary={"layers": layers, "dense_bytes": dense, "factorised_bytes": fact},
                           model_type=adapter.model_type)

    def describe(self, plan: WeightsPlan) -> str:
        st, sm = plan.settings, plan.summary
        share = sm["factorised_bytes"] / sm["dense_bytes"] if sm.get("dense_bytes") else 0
        return (f"compress (rank {st['rank']}, sparse part {100 * (1 - st['sparsity']):.0f}% dense): factorised "
                f"{100 * share:.1f}% of the decomposed experts' bytes")

    def report(self, plan: WeightsPlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        out = super().report(plan, before, after)
        out["note"] = ("merged experts replaced by their low-rank + sparse reconstruction, written dense (no stock "
                       "family holds factorised experts); summary.factorised_bytes is what factors would store")
        return out


COMPRESS = register_stage(CompressStage())

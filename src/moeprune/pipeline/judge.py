"""Layer-local judging of candidate expert-removal plans by K-fold cross-fitting on the calibration windows.

Folds (`split_folds`): each calibration set's N windows are cut into K contiguous folds (K_s = min(K, N) for a set
of fewer windows); fold-set "name#k" holds set `name`'s windows of fold k. A candidate judged on fold k was scored
on every OTHER fold only (`without_fold`), so no judge token ever fed the statistics that chose what it judges; the
final plans are scored on every window, as a single criterion run is.

Block error (`block_errors`), per MoE layer ℓ, fold-set f and candidate c with dropped set D_c(f, ℓ) (the plan
scored without f's fold), over the real tokens t of f:

    X_ℓ = the block's input in the ORIGINAL model (one layer-by-layer pass over every fold-set)
    Y_t = block_ℓ(X_ℓ)_t,   Ŷ_{c,t} = block_ℓ(X_ℓ)_t with D_c(f, ℓ) masked in the block's own router
    num_c(ℓ, f) = Σ_t ‖Y_t − Ŷ_{c,t}‖²,   den(ℓ, f) = Σ_t ‖Y_t‖²
Each distinct D is run once per (layer, fold-set), whatever the number of candidates that share it.

NLL (`judged_nll`): the whole model with every candidate's masks (`models/masking.py`, as verify uses) on every
fold-set, all candidates in one layer-by-layer pass (each decoder layer loaded once: works on lazy models too),
kept per window (`WindowNLL`); `WindowNLL.mean(groups)` gives

    nll_c = (1/|S|) Σ_s (Σ_{f ∈ s} NLL_{c,f}) / (Σ_{f ∈ s} N_f)    (mean over calibration sets s of the per-token
                                                                    NLL over the fold-sets f of s that are counted)
so every set weighs the same, as a geometric mean of per-set perplexity ratios does:
exp(nll_c − nll_original) = (Π_s ppl_{c,s} / ppl_{original,s})^{1/|S|}.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.calibration.data import CalibSet
from moeprune.calibration.engine import LayerInputs, pick_cache_device, run_one
from moeprune.calibration.session import make_batches
from moeprune.errors import MoePruneError
from moeprune.eval.token_scores import score_head
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_experts
from moeprune.select.drops import Drops, PerSet

JUDGE_FOLDS = 4  # default K (benchmarks/RESULTS.md, "auto")
LayerContext = Callable[[int], AbstractContextManager] | None


def fold_of(n: int, folds: int) -> list[int]:
    """Fold of each of a set's n windows: K_s = min(K, n) contiguous folds, window w in fold ⌊w·K_s / n⌋."""
    k = min(folds, n)
    return [w * k // n for w in range(n)]


def _windows(s: CalibSet, keep: list[bool], name: str) -> CalibSet:
    rows = torch.tensor(keep)
    return dataclasses.replace(s, name=name, input_ids=s.input_ids[rows], attention_mask=s.attention_mask[rows],
                               meta=dict(s.meta), held_out_ids=None)  # [n, L] each


def check_folds(sets: list[CalibSet], folds: int) -> None:
    """Every set needs two windows: one to judge while the others score."""
    for s in sets:
        N = int(s.input_ids.shape[0])
        if N < 2:
            raise MoePruneError(
                f"calibration set {s.name!r} has {N} window(s); method auto scores candidates on some windows and "
                "judges them on others, so it needs at least 2: add text, raise --samples or lower --seq-len.")
    if folds < 2:
        raise MoePruneError(f"judge_folds must be >= 2 (got {folds}).")


def split_folds(sets: list[CalibSet], folds: int) -> tuple[list[CalibSet], dict[str, tuple[str, int]]]:
    """(fold-sets "name#k" in set order then fold order, {fold-set: (set name, k)}) (module docstring)."""
    check_folds(sets, folds)
    out, where = [], {}
    for s in sets:
        of = fold_of(int(s.input_ids.shape[0]), folds)
        for k in sorted(set(of)):
            name = f"{s.name}#{k}"
            out.append(_windows(s, [f == k for f in of], name))
            where[name] = (s.name, k)
    return out, where


def without_fold(sets: list[CalibSet], folds: int, k: int) -> list[CalibSet]:
    """Each set without its fold-k windows (a set with no fold k stays whole): what fold k's candidates score on."""
    out = []
    for s in sets:
        keep = [f != k for f in fold_of(int(s.input_ids.shape[0]), folds)]
        out.append(s if all(keep) else _windows(s, keep, s.name))
    return out


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _copy(b: LayerInputs) -> LayerInputs:
    """Another stream of the same batch: hidden states are replaced (never written in place) as layers run; the
    per-layer kwargs dicts are copied because carried outputs are written into them."""
    return LayerInputs(b.hidden, [dict(k) for k in b.kwargs], b.attention_mask, b.tag, b.carries)


def _layer_pass(model: nn.Module, adapter: MoEAdapter, streams: dict[str, list[LayerInputs]],
                drops: dict[str, PerSet], *, device: str, layer_context: LayerContext, desc: str,
                last: int | None = None, on_layer=None, on_batch=None) -> None:
    """Every stream through decoder layers 0..`last` (default: all), stream c's batches of set f with `drops[c][f]`
    masked; each layer is entered (materialised, for a lazy model) once for all streams. Hidden states advance in
    place."""
    layers = adapter.decoder_layers(model)
    n = len(layers) if last is None else last + 1
    cache = pick_cache_device([b for batches in streams.values() for b in batches], device)
    for i in (bar := tqdm(range(n), leave=False)):
        bar.set_description(f"{desc} (layer {i + 1}/{n})")
        with layer_context(i) if layer_context is not None else nullcontext():
            for name, batches in streams.items():
                for tag in dict.fromkeys(b.tag for b in batches):  # each set's batches under its own mask
                    group = [b for b in batches if b.tag == tag]
                    drop = drops.get(name, {}).get(tag, {}).get(i)
                    with masked_experts(model, adapter, {i: drop}) if drop else nullcontext():
                        outs = run_one(layers[i], i, group, device, on_layer, on_batch, cache)
                    for b, out in zip(group, outs, strict=True):
                        b.hidden = out  # [B, S, H]


def everywhere(drops: Drops, sets: list[CalibSet]) -> PerSet:
    """The same dropped experts on every set."""
    return {s.name: drops for s in sets}


@dataclass
class BlockErrors:
    """num[c][ℓ][f] = Σ_t ‖Y − Ŷ_c‖², den[ℓ][f] = Σ_t ‖Y‖² over fold-set f's real tokens (module docstring)."""

    num: dict[str, dict[int, dict[str, float]]]
    den: dict[int, dict[str, float]]

    def error(self, c: str, groups: dict[str, list[str]]) -> dict[int, float]:
        """err_c(ℓ) = mean over sets s of Σ_{f∈s} num_c(ℓ, f) / Σ_{f∈s} den(ℓ, f)  (`groups`: set -> its fold-sets)."""
        return {layer: math.fsum(math.fsum(num[f] for f in fs) / math.fsum(self.den[layer][f] for f in fs)
                                 for fs in groups.values()) / len(groups)
                for layer, num in self.num[c].items()}


@torch.no_grad()
def block_errors(model: nn.Module, adapter: MoEAdapter, judge: list[CalibSet], candidates: dict[str, PerSet], *,
                 batch_size: int = 8, device: str = "cpu", layer_context: LayerContext = None) -> BlockErrors:
    """Every candidate's block error sums on every judge set (module docstring), on the original model's block
    inputs; `candidates[c][f]` is what c drops on set f."""
    moe = adapter.moe_layers()
    names = [s.name for s in judge]
    unique = {layer: {f: {tuple(sorted(d[f][layer])) for d in candidates.values()} for f in names} for layer in moe}
    num = {layer: {f: dict.fromkeys(u, 0.0) for f, u in per.items()} for layer, per in unique.items()}
    den = {layer: dict.fromkeys(names, 0.0) for layer in moe}
    state: dict = {}

    def on_batch(b: LayerInputs) -> None:
        state["valid"], state["set"] = b.attention_mask.bool(), b.tag  # [B, S]

    def on_layer(i: int, layer: nn.Module):
        if i not in den:
            return None
        block = adapter.block(model, i)

        def hook(module, args, kwargs, output) -> None:
            y = _first(output).double()  # [B, S, H] (or [B·S, H])
            valid = state["valid"].to(y.device).reshape(y.shape[:-1])  # real tokens only
            f = state["set"]
            den[i][f] += float(y.square().sum(-1)[valid].sum())
            for drop in num[i][f]:
                with masked_experts(model, adapter, {i: list(drop)}):
                    y_c = _first(module.forward(*args, **kwargs)).double()  # .forward: no hooks, no recursion
                num[i][f][drop] += float((y - y_c).square().sum(-1)[valid].sum())

        return block.register_forward_hook(hook, with_kwargs=True).remove

    batches = make_batches(model, adapter, judge, batch_size, device)
    runs = sum(len(u) for per in unique.values() for u in per.values())
    _layer_pass(model, adapter, {"original": batches}, {}, device=device, layer_context=layer_context,
                desc=f"auto: block errors of {runs} layer sets", last=max(moe), on_layer=on_layer, on_batch=on_batch)
    for layer, d in den.items():
        if any(v <= 0 for v in d.values()):
            raise MoePruneError(f"layer {layer}: the MoE block's output is zero on every token of a judge set; "
                                "method auto cannot judge candidates by block error there.")
    return BlockErrors({c: {layer: {f: num[layer][f][tuple(sorted(d[f][layer]))] for f in names} for layer in moe}
                        for c, d in candidates.items()}, den)


@dataclass
class WindowNLL:
    """One candidate's NLL on every judge window: per set, NLL sums [W] (float64) and predicted positions [W]."""

    nll: dict[str, torch.Tensor]
    count: dict[str, torch.Tensor]

    def mean(self, groups: dict[str, list[str]] | None = None) -> tuple[float, dict[str, float]]:
        """(mean over groups of the per-token NLL, {group: per-token NLL}); a group's NLL is over the windows of its
        member sets (`groups`: group -> set names; default: each set its own group). Groups without a counted
        position (or member) are left out."""
        groups = {s: [s] for s in self.nll} if groups is None else groups
        per = {}
        for g, members in groups.items():
            members = [m for m in members if m in self.nll]
            n = sum(int(self.count[m].sum()) for m in members)
            if n:
                per[g] = math.fsum(float(self.nll[m].sum()) for m in members) / n
        return math.fsum(per.values()) / len(per), per


@torch.no_grad()
def judged_nll(model: nn.Module, adapter: MoEAdapter, judge: list[CalibSet], candidates: dict[str, PerSet], *,
               batch_size: int = 8, device: str = "cpu", layer_context: LayerContext = None) -> dict[str, WindowNLL]:
    """{candidate: its NLL on every judge window} (module docstring: `WindowNLL.mean` gives nll_c);
    `candidates[c][f]` is what c drops on set f (none: the original model there)."""
    batches = make_batches(model, adapter, judge, batch_size, device)
    streams = {name: [_copy(b) for b in batches] for name in candidates}
    _layer_pass(model, adapter, streams, candidates, device=device, layer_context=layer_context,
                desc=f"auto: judge NLL of {len(candidates)} models")
    home = model.get_input_embeddings().weight.device
    ids = [s.input_ids[start : start + batch_size] for s in judge
           for start in range(0, s.input_ids.shape[0], batch_size)]  # [B, L] each, in make_batches' order
    out = {}
    for name, stream in streams.items():
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {s.name: [] for s in judge}
        for b, x in zip(stream, ids, strict=True):
            inputs = {"input_ids": x.to(home), "attention_mask": b.attention_mask.to(home)}
            scores = score_head(model, adapter, inputs, b.hidden.to(home))  # the head a chunk of positions at a time
            rows[b.tag].append((scores.nll, scores.counted))  # [B] each
        out[name] = WindowNLL({s: torch.cat([r[0] for r in v]) for s, v in rows.items()},  # [W] per set
                              {s: torch.cat([r[1] for r in v]) for s, v in rows.items()})
    return out


@contextmanager
def judge_model(ctx) -> Iterator[tuple]:
    """(model, layer_context) as the earlier stages leave it: whole in memory, or lazily one layer at a time."""
    if ctx.lazy:
        lazy, layer_context = ctx.lazy_model(dtype=ctx.calib.dtype, head=True)
        yield lazy.model, layer_context
        del lazy
    else:
        model = ctx.model(dtype=ctx.calib.dtype)
        yield model, None
        del model

"""Layer-local judging of candidate expert-removal plans on calibration windows held apart from the scoring ones.

Split (`split_judge`): each calibration set's last n windows (n = `judge_windows`, default ⌊N/4⌋, at least 1) go
to the judge; the statistics that score the candidates are computed on the first N − n only.

Block error (`block_errors`), per MoE layer ℓ and candidate c with dropped set D_c(ℓ), over the real judge tokens t:

    X_ℓ = the block's input in the ORIGINAL model (one layer-by-layer pass over the judge windows)
    Y_t = block_ℓ(X_ℓ)_t,   Ŷ_{c,t} = block_ℓ(X_ℓ)_t with D_c(ℓ) masked in the block's own router
    err_c(ℓ) = Σ_t ‖Y_t − Ŷ_{c,t}‖² / Σ_t ‖Y_t‖²
Each distinct D is run once per layer, whatever the number of candidates that share it.

NLL (`judged_nll`): the whole model with every candidate's masks (`models/masking.py`, as verify uses), on the judge
windows, all candidates in one layer-by-layer pass (each decoder layer loaded once: works on lazy models too):

    nll_c = (1/|S|) Σ_s NLL_{c,s} / N_s      (mean over calibration sets s of the per-token NLL on s)
so every set weighs the same, as a geometric mean of per-set perplexity ratios does:
exp(nll_c − nll_original) = (Π_s ppl_{c,s} / ppl_{original,s})^{1/|S|}. It is kept per window (`WindowNLL`), so the
caller can also take it over part of the judge windows (`select/auto.py` judges the per-layer composition on
windows that did not choose it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.calibration.data import CalibSet
from moeprune.calibration.engine import LayerInputs, head_logits, pick_cache_device, run_one
from moeprune.calibration.session import make_batches
from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.models.masking import masked_experts
from moeprune.select.auto import Drops

JUDGE_SHARE = 4  # default: a quarter of each set's windows judge (benchmarks/RESULTS.md, "auto": 1/3 measured too)
LayerContext = Callable[[int], AbstractContextManager] | None


def split_judge(sets: list[CalibSet], judge_windows: int | None = None) -> tuple[list[CalibSet], list[CalibSet]]:
    """(scoring sets, judge sets): each set's last n windows are the judge's, n = `judge_windows` or ⌊N/4⌋ ≥ 1.
    The scoring sets keep `held_out_ids` (the quality split reported after the prune); the judge sets have none."""
    scoring, judge = [], []
    for s in sets:
        N = int(s.input_ids.shape[0])
        n = judge_windows if judge_windows is not None else max(1, N // JUDGE_SHARE)
        if N - n < 1:
            raise MoePruneError(
                f"calibration set {s.name!r} has {N} window(s); method auto scores candidates on some and judges "
                f"them on {n} other(s), so it needs at least {n + 1}: add text, raise --samples, lower --seq-len"
                + (" or lower judge_windows." if judge_windows is not None else "."))
        scoring.append(CalibSet(s.name, s.input_ids[: N - n], s.attention_mask[: N - n], s.sha256, s.source,
                                s.documents, s.stream_tokens, dict(s.meta), held_out_ids=s.held_out_ids))
        judge.append(CalibSet(s.name, s.input_ids[N - n :], s.attention_mask[N - n :], s.sha256, s.source,
                              s.documents, s.stream_tokens, dict(s.meta)))  # [n, L] each
    return scoring, judge


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _copy(b: LayerInputs) -> LayerInputs:
    """Another stream of the same batch: hidden states are replaced (never written in place) as layers run; the
    per-layer kwargs dicts are copied because carried outputs are written into them."""
    return LayerInputs(b.hidden, [dict(k) for k in b.kwargs], b.attention_mask, b.tag, b.carries)


def _layer_pass(model: nn.Module, adapter: MoEAdapter, streams: dict[str, list[LayerInputs]],
                drops: dict[str, Drops], *, device: str, layer_context: LayerContext, desc: str,
                last: int | None = None, on_layer=None, on_batch=None) -> None:
    """Every stream through decoder layers 0..`last` (default: all), stream c with `drops[c]` masked; each layer is
    entered (materialised, for a lazy model) once for all streams. Hidden states advance in place."""
    layers = adapter.decoder_layers(model)
    n = len(layers) if last is None else last + 1
    cache = pick_cache_device([b for batches in streams.values() for b in batches], device)
    for i in (bar := tqdm(range(n), leave=False)):
        bar.set_description(f"{desc} (layer {i + 1}/{n})")
        with layer_context(i) if layer_context is not None else nullcontext():
            for name, batches in streams.items():
                drop = drops.get(name, {}).get(i)
                with masked_experts(model, adapter, {i: drop}) if drop else nullcontext():
                    outs = run_one(layers[i], i, batches, device, on_layer, on_batch, cache)
                for b, out in zip(batches, outs, strict=True):
                    b.hidden = out  # [B, S, H]


@torch.no_grad()
def block_errors(model: nn.Module, adapter: MoEAdapter, judge: list[CalibSet], candidates: dict[str, Drops], *,
                 batch_size: int = 8, device: str = "cpu",
                 layer_context: LayerContext = None) -> dict[str, dict[int, dict[str, float]]]:
    """{candidate: {MoE layer: {set: err_c(ℓ) on that set's judge tokens}}} (module docstring), on the original
    model's block inputs."""
    moe = adapter.moe_layers()
    names = [s.name for s in judge]
    unique = {layer: {tuple(sorted(d[layer])) for d in candidates.values()} for layer in moe}
    num = {layer: {drop: dict.fromkeys(names, 0.0) for drop in u} for layer, u in unique.items()}
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
            den[i][state["set"]] += float(y.square().sum(-1)[valid].sum())
            for drop in num[i]:
                with masked_experts(model, adapter, {i: list(drop)}):
                    y_c = _first(module.forward(*args, **kwargs)).double()  # .forward: no hooks, no recursion
                num[i][drop][state["set"]] += float((y - y_c).square().sum(-1)[valid].sum())

        return block.register_forward_hook(hook, with_kwargs=True).remove

    batches = make_batches(model, adapter, judge, batch_size, device)
    _layer_pass(model, adapter, {"original": batches}, {}, device=device, layer_context=layer_context,
                desc=f"auto: block errors of {sum(len(u) for u in unique.values())} layer sets", last=max(moe),
                on_layer=on_layer, on_batch=on_batch)
    for layer, d in den.items():
        if any(v <= 0 for v in d.values()):
            raise MoePruneError(f"layer {layer}: the MoE block's output is zero on every judge token of a set; "
                                "method auto cannot judge candidates by block error there.")
    return {name: {layer: {s: num[layer][tuple(sorted(d[layer]))][s] / den[layer][s] for s in names}
                   for layer in moe} for name, d in candidates.items()}


@dataclass
class WindowNLL:
    """One candidate's NLL on every judge window: per set, NLL sums [W] (float64) and predicted positions [W]."""

    nll: dict[str, torch.Tensor]
    count: dict[str, torch.Tensor]

    def mean(self, first: dict[str, int] | None = None) -> tuple[float, dict[str, float]]:
        """(mean over sets of the per-token NLL, {set: per-token NLL}) over every window, or each set's windows from
        index `first[set]` on."""
        per_set = {}
        for s, v in self.nll.items():
            start = 0 if first is None else first[s]
            n = int(self.count[s][start:].sum())
            if n:
                per_set[s] = float(v[start:].sum()) / n
        return math.fsum(per_set.values()) / len(per_set), per_set


def _row_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL sum [B], counted positions [B]) of logits [B, L, V]: position t predicts t+1 where both are real."""
    ids, mask = ids.to(logits.device), mask.to(logits.device)
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [B, L-1, V]
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # [B, L-1]
    counted = (mask[:, :-1] * mask[:, 1:]).bool()  # [B, L-1]
    return (nll * counted).sum(1).cpu(), counted.sum(1).cpu()


@torch.no_grad()
def judged_nll(model: nn.Module, adapter: MoEAdapter, judge: list[CalibSet], candidates: dict[str, Drops], *,
               batch_size: int = 8, device: str = "cpu", layer_context: LayerContext = None) -> dict[str, WindowNLL]:
    """{candidate: its NLL on every judge window} (module docstring: `WindowNLL.mean` gives nll_c); a candidate
    without drops is the original model."""
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
            rows[b.tag].append(_row_nll(head_logits(model, adapter, inputs, b.hidden.to(home)), x, b.attention_mask))
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

"""Another runtime's next-token log-probabilities (vLLM, ...) against transformers', on the same token ids.

`compare_logprobs(reference, candidate, prompts)` feeds the same token ids to both (tokenised once, so only the
models are compared). A provider is a callable `fn(prompts, k, new_tokens) -> [Scored]`, one per prompt of ids:

    Scored.rows      row t = log p(· | ids[:t+1]) for t = 0..T-1: a [T, V] array (every token) or a list of
                     {token id: log-prob} dicts holding at least the provider's top-k and the next prompt token
                     ids[t+1] (what vLLM's `prompt_logprobs=k` plus `logprobs=k` of one generated token return)
    Scored.greedy    its `new_tokens`-token greedy continuation of ids (no early stop)

The reference must give whole rows: `transformers_provider(model)` does (log_softmax of the model's float32 logits).
Per prompt, over every position t and every token v that the candidate returned:

    max |Δ logprob| = max_t,v |lp_cand[t, v] − lp_ref[t, v]|
    top-1 agreement = mean_t [the candidate's most likely token at t == argmax_v lp_ref[t, v]]   (ties: lowest id)
    greedy          = the two G-token greedy continuations are identical

It passes when max |Δ logprob| ≤ `TOLERANCE[dtype]` (the candidate's compute dtype) for every prompt and, for
float32, every greedy continuation is identical; a 16-bit candidate moves near-ties, so there greedy agreement is
reported, not required. The names and the pass rule follow `gguf/llama.py: verify_gguf`, which compares whole logit
rows instead (llama.cpp returns them all) and so measures relative logit error; log-probs are already normalised,
so the bound here is absolute, and the mean |Δ logprob| is reported next to the max.

The bf16 bound, measured with transformers itself in bf16 against float32 (`as_top_k`: only what vLLM returns, 4
prompts of `gguf.llama.VERIFY_TEXTS`): max |Δ logprob| 0.14 on a small testbed and its pruned copy, 0.09 and 0.11 on
the tiny qwen3_moe and gpt_oss; bf16 keeps 8 significant bits (~4e-3 relative per rounding) and the errors of every
layer add up in logits of magnitude ~10. 0.25 leaves room for another kernel's rounding order. A routed MoE can also
flip an expert choice on a near-tie of router scores, which moves the log-probs after it by far more than rounding:
the tiny deepseek_v3 (grouped routing) measured 1.05 the same way. A caller that measures such a baseline on the
same model passes `tolerance=` (`benchmarks/gpu_check.py` uses max(0.25, 2 × transformers' own bf16 error)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from moeprune.errors import MoePruneError

TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2.5e-1}
TOP_K = 5


@dataclass
class Scored:
    rows: np.ndarray | list[Mapping[int, float]]  # [T, V] or T dicts {token id: log-prob}
    greedy: list[int]


Provider = Callable[[Sequence[Sequence[int]], int, int], list[Scored]]


def _row_items(row) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, log-probs) of one row, dense or sparse."""
    if isinstance(row, Mapping):
        ids = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
        return ids, np.fromiter((float(row[int(i)]) for i in ids), dtype=np.float64, count=len(ids))
    arr = np.asarray(row, dtype=np.float64)
    return np.arange(arr.shape[0]), arr


def _best(ids: np.ndarray, lps: np.ndarray) -> int:
    """The most likely token; ties -> the lowest id (as np.argmax over a whole row)."""
    top = lps.max()
    return int(ids[lps == top].min())


@dataclass(frozen=True)
class LogprobCheck:
    runtime: str  # the candidate, e.g. "vllm"
    dtype: str  # its compute dtype (sets the tolerance)
    max_abs: float  # worst prompt's max |Δ logprob| over the tokens the candidate returned
    mean_abs: float  # mean |Δ logprob| over every compared (position, token), all prompts
    top1: float  # mean top-1 agreement over all positions
    greedy_same: int  # prompts whose greedy continuation is identical
    greedy_match: float  # mean fraction of greedy positions with the same token
    prompts: int
    positions: int  # positions compared, all prompts
    compared: int  # (position, token) pairs compared, all prompts
    tolerance: float
    per_prompt: tuple[float, ...]  # max |Δ logprob| of each prompt

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tolerance and (self.dtype != "float32" or self.greedy_same == self.prompts)

    def line(self) -> str:
        return (f"{self.runtime} vs transformers ({self.dtype}): max |Δ logprob| {self.max_abs:.2e} (tolerance "
                f"{self.tolerance:.2g}), mean {self.mean_abs:.1e}, over {self.compared} returned log-probs at "
                f"{self.positions} positions, top-1 agreement {self.top1:.3f}, identical greedy continuations "
                f"{self.greedy_same}/{self.prompts} (tokens {self.greedy_match:.3f}) -> "
                f"{'PASS' if self.passed else 'FAIL'}")

    def to_dict(self) -> dict:
        return {**asdict(self), "per_prompt": list(self.per_prompt), "passed": self.passed}


def compare_logprobs(reference: Provider, candidate: Provider, prompts: Sequence[Sequence[int]], *,
                     runtime: str, dtype: str, k: int = TOP_K, greedy_tokens: int = 16,
                     tolerance: float | None = None) -> LogprobCheck:
    """`candidate` against `reference` on `prompts` (token ids); see the module docstring."""
    if not prompts or any(len(p) < 1 for p in prompts):
        raise MoePruneError("compare_logprobs: need at least one prompt of at least one token.")
    if tolerance is None:
        if dtype not in TOLERANCE:
            raise MoePruneError(f"compare_logprobs: no tolerance for dtype {dtype!r} (known: {', '.join(TOLERANCE)});"
                                " pass tolerance=.")
        tolerance = TOLERANCE[dtype]
    prompts = [list(map(int, p)) for p in prompts]
    refs = reference(prompts, k, greedy_tokens)
    cands = candidate(prompts, k, greedy_tokens)
    if len(refs) != len(prompts) or len(cands) != len(prompts):
        raise MoePruneError(f"compare_logprobs: {len(prompts)} prompts, but the reference scored {len(refs)} and the "
                            f"candidate {len(cands)}.")
    per_prompt, agree, same, match, deltas = [], [], 0, [], []
    for ids, ref, cand in zip(prompts, refs, cands, strict=True):
        dense = None if isinstance(ref.rows, list) and ref.rows and isinstance(ref.rows[0], Mapping) else \
            np.asarray(ref.rows, dtype=np.float64)  # [T, V]
        if dense is None or dense.ndim != 2 or dense.shape[0] != len(ids):
            raise MoePruneError(f"compare_logprobs: the reference must give a [T, V] array for T = {len(ids)} tokens, "
                                f"got {'dicts' if dense is None else f'shape {dense.shape}'}.")
        if len(cand.rows) != len(ids):
            raise MoePruneError(f"compare_logprobs: the candidate gave {len(cand.rows)} rows for {len(ids)} tokens.")
        worst = 0.0
        for t, row in enumerate(cand.rows):
            tok, lp = _row_items(row)
            if t + 1 < len(ids) and ids[t + 1] not in set(tok.tolist()):
                raise MoePruneError(f"compare_logprobs: the candidate's row {t} lacks the next prompt token "
                                    f"{ids[t + 1]}.")
            if not tok.size:
                raise MoePruneError(f"compare_logprobs: the candidate's row {t} is empty.")
            if tok.min() < 0 or tok.max() >= dense.shape[1]:
                raise MoePruneError(f"compare_logprobs: the candidate's row {t} names token ids outside the "
                                    f"reference's vocabulary of {dense.shape[1]}.")
            delta = np.abs(lp - dense[t, tok])  # [returned]
            worst = max(worst, float(delta.max()))
            deltas.append(delta)
            agree.append(_best(tok, lp) == int(np.argmax(dense[t])))
        per_prompt.append(worst)
        g_ref, g_cand = list(map(int, ref.greedy)), list(map(int, cand.greedy))
        same += int(g_ref == g_cand)
        n = max(len(g_ref), len(g_cand), 1)
        match.append(sum(a == b for a, b in zip(g_ref, g_cand, strict=False)) / n)
    flat = np.concatenate(deltas)  # [compared]
    return LogprobCheck(runtime, dtype, max(per_prompt), float(flat.mean()), float(np.mean(agree)), same,
                        float(np.mean(match)), len(prompts), len(agree), int(flat.size), tolerance, tuple(per_prompt))


def transformers_provider(model) -> Provider:
    """Whole rows: log_softmax of `model`'s logits taken in float32 (in whatever dtype the model computes), and
    its greedy continuation (`eval/generate.greedy_continuations`: no early stop, ties -> the lowest id)."""
    import torch

    from moeprune.eval.generate import greedy_continuations

    device = next(model.parameters()).device

    def fn(prompts, k, new_tokens):
        out = []
        for ids in prompts:
            x = torch.tensor([list(ids)], device=device)  # [1, T]
            with torch.no_grad():
                rows = torch.log_softmax(model(x).logits[0].float(), dim=-1).double().cpu().numpy()  # [T, V]
            greedy = greedy_continuations(model, x, new_tokens)[0].tolist() if new_tokens else []  # [G]
            out.append(Scored(rows, greedy))
        return out

    return fn


def top_k_rows(rows: np.ndarray, ids: Sequence[int], k: int) -> list[dict[int, float]]:
    """Whole rows [T, V] -> what vLLM returns: per row its top-k (ties -> lower ids first) and the next prompt
    token."""
    out = []
    for t, row in enumerate(np.asarray(rows)):
        keep = np.argsort(-row, kind="stable")[:k].tolist()
        if t + 1 < len(ids):
            keep.append(int(ids[t + 1]))
        out.append({int(v): float(row[v]) for v in keep})
    return out


def as_top_k(provider: Provider) -> Provider:
    """`provider` returning only what a vLLM-like runtime returns (`top_k_rows`): a stand-in candidate."""

    def fn(prompts, k, new_tokens):
        return [Scored(top_k_rows(s.rows, ids, k), s.greedy)
                for ids, s in zip(prompts, provider(prompts, k, new_tokens), strict=True)]

    return fn


def vllm_rows(output) -> list[dict[int, float]]:
    """One `vllm.RequestOutput` of `SamplingParams(prompt_logprobs=k, logprobs=k)` -> rows t = 0..T-1.

    vLLM's `prompt_logprobs[t]` is the distribution that predicted prompt token t (None for t = 0), so row t is
    `prompt_logprobs[t + 1]`; the last row is the first generated token's `logprobs[0]`."""
    prompt = list(output.prompt_logprobs or [])
    gen = output.outputs[0].logprobs
    if not gen:
        raise MoePruneError("vLLM returned no log-probs for the generated token (SamplingParams(logprobs=k)?).")
    if len(prompt) != len(output.prompt_token_ids):
        raise MoePruneError(f"vLLM returned {len(prompt)} prompt log-prob rows for {len(output.prompt_token_ids)} "
                            "prompt tokens (SamplingParams(prompt_logprobs=k)?).")
    return [{int(v): float(getattr(lp, "logprob", lp)) for v, lp in row.items()} for row in [*prompt[1:], gen[0]]]


def vllm_provider(llm) -> Provider:
    """A provider from a `vllm.LLM`: greedy (temperature 0), the ids fed as `prompt_token_ids` (no tokenizer in
    between); log-probs with one generated token, the greedy continuation with `ignore_eos` (no early stop)."""
    from vllm import SamplingParams

    def fn(prompts, k, new_tokens):
        reqs = [{"prompt_token_ids": list(ids)} for ids in prompts]
        scored = llm.generate(reqs, SamplingParams(max_tokens=1, prompt_logprobs=k, logprobs=k, temperature=0),
                              use_tqdm=False)
        greedy = llm.generate(reqs, SamplingParams(max_tokens=max(new_tokens, 1), temperature=0, ignore_eos=True),
                              use_tqdm=False)
        return [Scored(vllm_rows(s), list(g.outputs[0].token_ids)[:new_tokens])
                for s, g in zip(scored, greedy, strict=True)]

    return fn

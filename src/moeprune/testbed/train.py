"""Train the testbed MoE: a small Qwen3-MoE causal LM on the four testbed domains, on CPU, deterministically.

Objective per step:

    L = CE(next token) + α · (1/#layers) · Σ_l E · Σ_e f_{l,e} · P_{l,e}      (Switch load balancing, per layer)

f_{l,e} = fraction of layer l's routed slots (token × top-k) sent to expert e, P_{l,e} = mean router probability
of e in layer l, α = `aux_coef`; each layer's term is 1 when perfectly balanced. (transformers' own
`load_balancing_loss_func` pools all layers' tokens before balancing, so expert e of one layer can stay dead
while expert e of another is busy; balancing per layer avoids dead experts.)
Each batch holds `batch_size / #domains` random windows of every domain (windows of `seq_len` tokens drawn from the
domain's token stream with a seeded generator), AdamW with linear warm-up and cosine decay to 10 %, gradient
clipping at 1. Same config + same CPython + same torch thread count = same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.log import logger


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest class

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 16
    top_k: int = 2
    moe_intermediate_size: int = 128
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 40
    aux_coef: float = 0.01
    train_chars: int = 1_500_000  # per domain
    calib_chars: int = 60_000
    heldout_chars: int = 120_000
    tokenizer_chars: int = 400_000  # per domain, for BPE training
    threads: int = 1  # torch threads while training: fixed so builds repeat exactly; 2 threads thrash when the
    # other core is busy (measured 0.4 -> 12 s/step), one thread holds 0.7 s/step

    def __post_init__(self) -> None:
        if self.num_experts < 2 or not 1 <= self.top_k < self.num_experts:
            raise MoePruneError(f"testbed: need 2+ experts and 1 <= top_k < experts, got {self.num_experts}, "
                                f"{self.top_k}.")
        if self.batch_size % 4:
            raise MoePruneError("testbed: batch_size must be a multiple of 4 (one share per domain).")
        if min(self.steps, self.seq_len, self.hidden_size, self.threads) < 1:
            raise MoePruneError("testbed: steps, seq_len, hidden_size and threads must be >= 1.")

    def budget(self) -> dict[str, int]:
        return {"train": self.train_chars, "calib": self.calib_chars, "heldout": self.heldout_chars}

    def to_dict(self) -> dict:
        return asdict(self)


def model_config(cfg: TestbedConfig, tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=True,
        max_position_embeddings=max(512, cfg.seq_len), tie_word_embeddings=True, router_aux_loss_coef=cfg.aux_coef,
        output_router_logits=False, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_at(step: int, cfg: TestbedConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0.1 · lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def sample_batch(streams: list[torch.Tensor], per_domain: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """streams: one [S_d] token stream per domain -> [per_domain · #domains, seq_len] windows at random offsets."""
    rows = []
    for s in streams:
        starts = torch.randint(0, s.numel() - seq_len, (per_domain,), generator=gen)
        rows += [s[i : i + seq_len] for i in starts.tolist()]
    return torch.stack(rows)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Mean over layers of E · Σ_e f_e · P_e; router_logits: one [T, E] tensor per MoE layer."""
    terms = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # [T, E]
        E = probs.shape[-1]
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)  # [T, E] 0/1
        f = chosen.mean(dim=0) / top_k  # [E] share of slots
        terms.append(E * (f * probs.mean(dim=0)).sum())
    return torch.stack(terms).mean()


def train_model(cfg: TestbedConfig, tokenizer, streams: list[torch.Tensor]):
    """-> (trained Qwen3MoeForCausalLM in eval mode, training log {step: [loss, aux]})."""
    from transformers import Qwen3MoeForCausalLM

    short = [i for i, s in enumerate(streams) if s.numel() <= cfg.seq_len + 1]
    if short:
        raise MoePruneError(f"testbed: domain streams {short} are shorter than seq_len={cfg.seq_len}.")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        model = Qwen3MoeForCausalLM(model_config(cfg, tokenizer))
        model.set_experts_implementation("grouped_mm")  # fused grouped GEMM: ~1.5x faster than the loop on CPU
        model.router_aux_loss_coef = 0.0  # out.loss = CE only; the per-layer balance term is added below
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
        gen = torch.Generator().manual_seed(cfg.seed)
        per_domain = cfg.batch_size // len(streams)
        log: dict[int, list[float]] = {}
        t0 = time.perf_counter()
        bar = tqdm(range(cfg.steps), desc="training testbed", unit="step")
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            x = sample_batch(streams, per_domain, cfg.seq_len, gen)
            out = model(input_ids=x, labels=x, output_router_logits=True)
            aux_t = balance_loss(out.router_logits, cfg.top_k)
            (out.loss + cfg.aux_coef * aux_t).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ce, aux = float(out.loss.detach()), float(aux_t.detach())
            if step % 10 == 0 or step == cfg.steps - 1:
                log[step] = [ce, aux]
                bar.set_postfix(ce=f"{ce:.3f}", aux=f"{aux:.3f}")
        logger.info("testbed trained: %d steps in %.0f s, last CE %.3f", cfg.steps, time.perf_counter() - t0, ce)
        model.set_experts_implementation("eager")
        model.router_aux_loss_coef = cfg.aux_coef
        model.eval()
        return model, log
    finally:
        torch.set_num_threads(threads)

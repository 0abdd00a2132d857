"""MC# OTP (Online Top-any Pruning): a learned per-layer selector drops some of the router's top-k per token.

Per MoE layer ℓ a linear selector reads the router's input hidden state x_t [H] and the token's top-k gate weights
sorted by weight, w_(1) ≥ … ≥ w_(k), and outputs one keep/drop logit per rank:

    z_t = W_ℓ · [x_t ; w_(1..k)] + b_ℓ          W_ℓ [k, H + k], b_ℓ [k]
    keep rank r  ⇔  z_t,j > 0 for every 2 ≤ j ≤ r      (rank 1, the top-weight expert, always kept)

i.e. the kept experts are a prefix of the top-k by weight, of any length 1..k ("top-any"): a rank is kept when its
logit and those of every heavier rank are positive. The prefix form is the one every routing kind's masked second
pass reproduces (`models/dynamic.py`; on DeepSeek-V3's group-limited sigmoid router a kept set with a gap — ranks
1 and 3 without 2 — was measured to be mis-routed for about 1 token in 256) and the one top_p / naee_skip keep too.

The kept experts are routed through the family's own router (`models/dynamic.py`, like top_p / naee_skip).

Training (`train_otp`): the model's weights are frozen; only the selectors train (torch.optim.AdamW) on calibration
windows. In the forward each router's output weights are gated by a straight-through Gumbel (binary concrete)
sample, h_r = hard(σ((z_r + log u − log(1−u)) / τ)) with the soft value's gradient, h_1 = 1, g_r = Π_{j≤r} h_j
(the prefix), and renormalised as
the family renormalises its top-k (w' = w·g · Σw / Σ(w·g) when it does) — the forward is then the one the hard
policy routes. Loss per step:

    KL(p_original ‖ p_gated)   (next-token distributions on the real tokens, mean over tokens)
      + λ · mean_ℓ mean_t (1 + Σ_{r≥2} σ(z_t,r))          (expected active experts per token)

KL to the original's logits rather than the LM loss on the text: the frozen original is the ceiling this policy
can reach, KL gives a dense signal over the whole vocabulary per token (lower variance than one target token),
and a selector that minimised LM loss could learn to drop experts where dropping happens to fit the calibration
text better than the original, which does not carry to held-out text. λ is a Lagrange multiplier, updated by
dual ascent so that the hard active rate meets `target_active`: λ ← max(0, λ + η·(active − A)). After training, one
shift δ (the same for every layer) is subtracted from every b_ℓ so that the hard rule keeps exactly A experts
per token on average over the layers, on calibration tokens captured with the model's own routing (`calibrate`);
the layers keep the allocation they learned. The plan records δ, the training cost (seconds, steps, tokens) and
the final λ.

Selector tensors: `layer.{ℓ}.weight` [k, H + k] and `layer.{ℓ}.bias` [k] (float32), in a safetensors side file
(`SELECTOR_FILE` in an export, named by the `moeprune_routing` block's `otp.selector_file`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.routing.fit import batches as calib_batches

SELECTOR_FILE = "moeprune_otp.safetensors"
Selectors = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (W [k, H + k], b [k])


# ------------------------------------------------------------------------------------------- the rule
def rank_order(w: torch.Tensor) -> torch.Tensor:
    """order [N, k]: slot indices by gate weight, largest first (ties by slot order)."""
    return torch.sort(w.double(), dim=-1, descending=True, stable=True)[1]


def selector_logits(x: torch.Tensor, w: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                    order: torch.Tensor | None = None) -> torch.Tensor:
    """z [N, k] per rank (rank 0 = the largest weight) from x [N, H] and w [N, k] (slot order)."""
    order = rank_order(w) if order is None else order
    ws = w.gather(1, order)  # [N, k] sorted
    feats = torch.cat([x.to(W.dtype), ws.to(W.dtype)], dim=-1)  # [N, H + k]
    return feats @ W.to(feats.device).T + b.to(feats.device)  # [N, k]


def keep_otp(x: torch.Tensor, w: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """keep [N, k] (slot order): the top-weight slot, and every slot whose rank's logit and those of all heavier
    ranks are > 0."""
    order = rank_order(w)
    keep_rank = selector_logits(x, w, W, b, order) > 0  # [N, k]
    keep_rank[:, 0] = True
    keep_rank = torch.cummin(keep_rank.int(), dim=-1)[0].bool()  # a prefix: stop at the first drop
    return torch.zeros_like(keep_rank).scatter_(1, order, keep_rank)


class OTPDecide:
    """`models/dynamic.Decide` of an OTP plan: called with the router's input x [N, H]."""

    takes_input = True

    def __init__(self, selectors: Selectors):
        self.selectors = selectors

    def __call__(self, w, sel, layer, x):
        W, b = self.selectors[layer]
        return keep_otp(x.float(), w.float(), W, b)


# ------------------------------------------------------------------------------------------- files
def selectors_sha256(selectors: Selectors) -> str:
    h = hashlib.sha256()
    for layer in sorted(selectors):
        for t in selectors[layer]:
            h.update(str(layer).encode())
            h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def save_selectors(selectors: Selectors, path: Path) -> None:
    flat = {}
    for layer, (W, b) in selectors.items():
        flat[f"layer.{layer}.weight"] = W.detach().float().contiguous().cpu()
        flat[f"layer.{layer}.bias"] = b.detach().float().contiguous().cpu()
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata={"format": "moeprune.otp/1"})
    tmp.replace(path)


def load_selectors(path: Path, layers: list[int], top_k: int, sha256: str | None) -> Selectors:
    if not path.is_file():
        raise MoePruneError(f"the OTP routing policy's selector file {path} is missing; copy it with the config.json "
                            "(or the plan JSON) that names it.")
    flat = load_file(str(path))
    out: Selectors = {}
    for layer in layers:
        W, b = flat.get(f"layer.{layer}.weight"), flat.get(f"layer.{layer}.bias")
        if W is None or b is None or W.dim() != 2 or W.shape[0] != top_k or b.shape != (top_k,):
            raise MoePruneError(f"{path}: no selector [{top_k}, H + {top_k}] for MoE layer {layer}.")
        out[layer] = (W, b)
    if sha256 is not None and selectors_sha256(out) != sha256:
        raise MoePruneError(f"{path}: its selectors do not match the sha256 the routing plan records (changed or "
                            "corrupt).")
    return out


# ------------------------------------------------------------------------------------------- training
@dataclass
class OTPConfig:
    target_active: float
    steps: int = 200
    lr: float = 1e-2
    batch_size: int = 8
    tau: float = 1.0  # Gumbel temperature
    dual_lr: float = 0.05  # η of the λ update
    seed: int = 0
    calib_tokens: int = 16384  # per layer, for the final shift


@dataclass
class OTPResult:
    selectors: Selectors
    cost: dict  # seconds, steps, tokens, final λ, active rate of the last steps
    shift: float
    calibrated_active: dict[int, float]


def _renormalises(adapter: MoEAdapter) -> bool:
    spec = adapter.routing()
    return bool(spec.norm_topk_prob) or spec.kind == "topk_softmax"


class _Gates:
    """Training hooks: every router's weights multiplied by a straight-through Gumbel gate from its selector."""

    def __init__(self, model, adapter, selectors: nn.ModuleDict, tau: float, generator: torch.Generator):
        self.sel, self.tau, self.gen = selectors, tau, generator
        self.renorm = _renormalises(adapter)
        self.expected: list[torch.Tensor] = []  # per layer call: mean expected active (differentiable)
        self.hard: list[float] = []
        self.valid: torch.Tensor | None = None  # [N] bool, real tokens
        self.enabled = True
        self.handles = []
        from moeprune.models.dynamic import _split_output

        for layer in adapter.moe_layers():
            router = adapter.router(adapter.block(model, layer))
            self.handles.append(router.register_forward_hook(self._hook(str(layer), adapter.router_logits_at,
                                                                        _split_output), with_kwargs=True))

    def _hook(self, key, logits_at, split):
        def hook(module, args, kwargs, out):
            if not self.enabled:
                return out
            _, w_at, idx_at = split(out, logits_at)
            w = out[w_at]  # [N, k]
            N, k = w.shape
            x = (args[0] if args else next(iter(kwargs.values()))).reshape(N, -1).detach().float()
            lin = self.sel[key]
            order = rank_order(w.detach())
            z = selector_logits(x, w.detach().float(), lin.weight, lin.bias, order)  # [N, k] per rank
            u = torch.rand(z.shape, generator=self.gen).clamp(1e-6, 1 - 1e-6).to(z.device)
            soft = torch.sigmoid((z + u.log() - (-u).log1p()) / self.tau)  # [N, k]
            gate = (soft > 0.5).float() + soft - soft.detach()  # straight-through
            gate = torch.cat([torch.ones_like(gate[:, :1]), gate[:, 1:]], dim=1)  # rank 0 always kept
            gate = torch.cumprod(gate, dim=1)  # [N, k] a prefix of the ranks (see `keep_otp`)
            g = torch.zeros_like(gate).scatter(1, order, gate)  # [N, k] slot order
            w2 = w.float() * g
            if self.renorm:
                w2 = w2 * (w.float().sum(-1, keepdim=True) / w2.sum(-1, keepdim=True).clamp_min(1e-12))
            rows = self.valid if self.valid is not None and self.valid.numel() == N else slice(None)
            keep_p = torch.cumprod(torch.sigmoid(z[:, 1:]), dim=1)  # [N, k-1] P(rank kept) as a prefix
            self.expected.append(1 + keep_p[rows].sum(-1).mean())
            self.hard.append(float(gate.detach()[rows].sum(-1).mean()))
            return tuple(w2.to(w.dtype) if i == w_at else t for i, t in enumerate(out))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def train_otp(model: nn.Module, adapter: MoEAdapter, sets, cfg: OTPConfig, device: str = "cpu") -> OTPResult:
    """Selectors for every MoE layer of `model` (frozen), trained on the calibration windows `sets`."""
    k = adapter.top_k
    if not 1 <= cfg.target_active <= k:
        raise MoePruneError(f"otp: target_active {cfg.target_active:g} must be in [1, {k}] (the model routes top-{k}).")
    H = int(adapter.config.hidden_size)
    torch.manual_seed(cfg.seed)
    sel = nn.ModuleDict({str(layer): nn.Linear(H + k, k) for layer in adapter.moe_layers()}).to(device)
    for lin in sel.values():
        nn.init.zeros_(lin.weight)
        nn.init.constant_(lin.bias, 2.0)  # start near the model's own top-k
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(sel.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = calib_batches(sets, cfg.batch_size)
    batches = [batches[i] for i in torch.randperm(len(batches), generator=torch.Generator().manual_seed(cfg.seed))]
    if not batches:
        raise MoePruneError("otp: no calibration windows to train the selectors on.")
    lam, tokens, recent = 0.0, 0, []
    gates = _Gates(model, adapter, sel, cfg.tau, gen)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for step in (bar := tqdm(range(cfg.steps), desc="otp selectors", leave=False)):
            ids, mask = batches[step % len(batches)]
            ids, mask = ids.to(device), mask.to(device)
            valid = mask.reshape(-1).bool()
            gates.enabled = False  # the original's next-token distributions
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # [B, S, V]
            gates.enabled, gates.valid, gates.expected, gates.hard = True, valid, [], []
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            kl = (ref.exp() * (ref - logp)).sum(-1).reshape(-1)[valid].mean()
            expected = torch.stack(gates.expected).mean()
            loss = kl + lam * expected
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            active = sum(gates.hard) / len(gates.hard)
            lam = max(0.0, lam + cfg.dual_lr * (active - cfg.target_active))
            tokens += int(valid.sum())
            recent = (recent + [active])[-20:]
            bar.set_postfix(kl=f"{float(kl.detach()):.4f}", active=f"{active:.2f}", lam=f"{lam:.3f}")
    finally:
        gates.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    seconds = time.perf_counter() - start
    selectors = {int(key): (lin.weight.detach().cpu().clone(), lin.bias.detach().cpu().clone())
                 for key, lin in sel.items()}
    shift, calibrated = calibrate(model, adapter, selectors, sets, cfg.target_active, cfg.batch_size,
                                  cfg.calib_tokens, device)
    cost = {"seconds": seconds, "steps": cfg.steps, "tokens": tokens, "lambda": lam, "optimizer": "AdamW",
            "lr": cfg.lr, "tau": cfg.tau, "loss": "KL(original || gated) + lambda * expected active",
            "train_active_last20": sum(recent) / len(recent) if recent else None}
    logger.info("otp: selectors trained in %.1fs (%d steps, %d tokens); shift %.3g -> %.3f active per token",
                seconds, cfg.steps, tokens, shift, sum(calibrated.values()) / len(calibrated))
    return OTPResult(selectors, cost, shift, calibrated)


@torch.no_grad()
def capture_inputs(model, adapter, sets, batch_size: int, max_tokens: int, device: str = "cpu",
                   selectors: Selectors | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (x [N, H], w [N, k])} on real calibration tokens (up to max_tokens / len(sets) of every set), with
    the model's own routing, or with the OTP policy of `selectors` routing the earlier layers."""
    from moeprune.models.dynamic import install_policy

    kept: dict[int, list] = {layer: [] for layer in adapter.moe_layers()}
    valid: list[torch.Tensor] = []

    def record(w, sel, layer, x):
        rows = valid[0] if valid and valid[0].numel() == w.shape[0] else slice(None)
        kept[layer].append((x[rows].float().cpu(), w[rows].float().cpu()))
        if selectors is None:
            return torch.ones_like(w, dtype=torch.bool)
        return keep_otp(x.float(), w.float(), *selectors[layer])

    record.takes_input = True
    inst = install_policy(model, adapter, record, check=False)
    per_set = max(1, max_tokens // max(1, len(sets)))
    try:
        for s in sets:
            seen = 0
            for ids, mask in calib_batches([s], batch_size):
                valid[:] = [mask.reshape(-1).bool().to(device)]
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                seen += int(mask.sum())
                if seen >= per_set:
                    break
    finally:
        inst.remove()
    return {layer: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for layer, v in kept.items() if v}


def active_counts(captured, selectors: Selectors, shift: float = 0.0) -> dict[int, float]:
    out = {}
    for layer, (x, w) in captured.items():
        W, b = selectors[layer]
        out[layer] = float(keep_otp(x, w, W, b - shift).sum(-1).double().mean())
    return out


def calibrate(model, adapter, selectors: Selectors, sets, target: float, batch_size: int, max_tokens: int,
              device: str = "cpu", rounds: int = 3) -> tuple[float, dict[int, float]]:
    """Fold one shift δ into every selector's bias (in place) so the mean active over layers is `target` on
    captured calibration tokens; returns (δ, active per layer on the last capture).

    Round 1 captures the router inputs with the model's own routing; rounds 2.. with the shifted policy routing
    the earlier layers (the inputs the policy really sees), and re-fit δ on them."""
    from moeprune.routing.fit import _bisect

    total, policy = 0.0, None
    for _ in range(rounds):
        captured = capture_inputs(model, adapter, sets, batch_size, max_tokens, device, policy)
        base = {layer: (W, b - total) for layer, (W, b) in selectors.items()}
        mean = lambda d, c=captured, base=base: sum(active_counts(c, base, d).values()) / len(c)  # noqa: E731
        span = 1.0 + max(float(selector_logits(x, w, *base[layer]).abs().max()) for layer, (x, w) in captured.items())
        total += _bisect(mean, -span, span, target, increasing=False)
        policy = {layer: (W, b - total) for layer, (W, b) in selectors.items()}
    captured = capture_inputs(model, adapter, sets, batch_size, max_tokens, device, policy)
    selectors.update(policy)
    return total, active_counts(captured, selectors)

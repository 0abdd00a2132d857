"""`distill_model`: train the student toward the teacher's stored targets, in place, on one device.

    select what trains (trainable.py; LoRA adapters: lora.py)          everything else frozen, model in eval mode
    resume from checkpoint_dir when it holds this run's state          (checkpoint.py)
    for step s = start .. S − 1:
        windows = batch_indices(seed, s, N, batch_size)                 (data.py: a function of seed and step)
        loss = T² · KL(teacher ‖ student) [+ w · hidden MSE]            (loss.py), backward, clip, AdamW, schedule
        every `checkpoint_every` steps and at the end: save the state   (atomic)
    merge LoRA adapters into the dense weights
The summary holds the loss curve (mean over each `log_every` steps), the KL over every calibration window before
and after (full logits: at T = 1; top-k: the K ∪ {rest} KL at the run's T), tokens seen and wall time (summed
over resumed runs).
`callback(step, info)` runs after every step (tests interrupt a run by raising from it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.distill.checkpoint import load_state, normalise, save_state
from moeprune.distill.config import RUN_ONLY, DistillConfig
from moeprune.distill.data import batch_indices, windows_sha256
from moeprune.distill.lora import add_lora, merge_lora
from moeprune.distill.loss import distill_loss, layer_outputs, token_kl
from moeprune.distill.optim import make_optimizer, make_scheduler
from moeprune.distill.teacher import TeacherTargets
from moeprune.distill.trainable import select_trainables
from moeprune.errors import MoePruneError
from moeprune.log import logger
from moeprune.models import get_adapter


@torch.no_grad()
def calibration_kl(model: nn.Module, targets: TeacherTargets, device: str | torch.device = "cpu",
                   batch_size: int = 8) -> float:
    """Mean KL(teacher ‖ model) over every real token of the calibration windows, at T = 1 (full logits) or at the
    targets' temperature (top-k: log Z is stored at that one)."""
    total, count = 0.0, 0
    for start in range(0, targets.windows, batch_size):
        ids, mask, teacher = targets.batch(range(start, min(start + batch_size, targets.windows)), device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V]
        kl = token_kl(logits, teacher, mask, targets.temperature if targets.topk else 1.0)  # [n]
        total += float(kl.double().sum())
        count += kl.numel()
    return total / max(count, 1)


def distill_model(student: nn.Module, targets: TeacherTargets, config: DistillConfig, *,
                  device: str | torch.device = "cpu", fingerprint: dict | None = None,
                  callback: Callable[[int, dict], Any] | None = None, eval_batch_size: int = 8) -> dict:
    """Train `student` (in place; LoRA merged back) on `targets`; returns the summary. `fingerprint`: what
    identifies the student (source model, earlier plans) for resuming from `config.checkpoint_dir`."""
    config.validate()
    began = time.perf_counter()
    if targets.topk and targets.temperature != config.temperature:
        raise MoePruneError(f"the top-k teacher targets hold log Z at temperature {targets.temperature}; compute them "
                            f"at the run's temperature {config.temperature}.")
    if config.hidden_weight > 0 and targets.hidden is None:
        raise MoePruneError("hidden_weight > 0 matches decoder-layer outputs: compute the teacher targets with "
                            "hidden=True.")
    adapter = get_adapter(student.config, model=student)
    layers = list(adapter.decoder_layers(student))
    total = config.total_steps(targets.seq_len)
    student.to(device).eval()
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        chosen = select_trainables(student, adapter, [t for t in config.train if t != "lora"])
        wrapped = add_lora(student, adapter, config.rank, config.alpha) if "lora" in config.train else None
        for p in chosen:  # peft freezes every parameter but its adapters
            p.requires_grad_(True)
        student.eval()  # peft's new modules start in training mode
        params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        fp = {**{k: v for k, v in config.settings().items() if k not in RUN_ONLY}, "total_steps": total,
              "trainable": {n: list(p.shape) for n, p in params.items()}, "teacher_topk": targets.topk,
              "windows": windows_sha256(targets.input_ids, targets.attention_mask), **(fingerprint or {})}
        optimizer = make_optimizer(list(params.values()), config)
        scheduler = make_scheduler(optimizer, total, config)
        progress = {"curve": [], "tokens": 0, "seconds": 0.0, "kl_start": None, "acc": [0.0, 0]}
        start = 0
        state = load_state(config.checkpoint_dir, fp) if config.checkpoint_dir else None
        if state is not None:
            start = _restore(state, params, optimizer, scheduler)
            progress = state["progress"]
            logger.info("distill: resuming at step %d/%d from %s", start, total, config.checkpoint_dir)
        if progress["kl_start"] is None:
            progress["kl_start"] = calibration_kl(student, targets, device, eval_batch_size)
        before = progress["seconds"]  # wall time of the earlier runs this one resumes
        _train(student, layers, targets, config, params, optimizer, scheduler, start, total, progress, fp, device,
               callback, lambda: before + time.perf_counter() - began)
        if wrapped is not None:
            merge_lora(wrapped)
    for p in student.parameters():
        p.requires_grad_(False)
    kl_end = calibration_kl(student, targets, device, eval_batch_size)
    if kl_end > progress["kl_start"]:
        logger.warning("distill: the calibration KL rose from %.4g to %.4g — the student was already close to the "
                       "teacher, or the learning rate (%g) is too high for it; try a lower lr or fewer steps.",
                       progress["kl_start"], kl_end, config.lr)
    return {"steps": total, "resumed_at": start or None, "tokens": progress["tokens"],
            "seconds": round(before + time.perf_counter() - began, 3), "kl_start": progress["kl_start"],
            "kl_end": kl_end,
            "kl": f"top-{targets.topk} + rest at T={targets.temperature:g}" if targets.topk else "full at T=1",
            "trainable_parameters": sum(p.numel() for p in params.values()), "windows": targets.windows,
            "seq_len": targets.seq_len, "teacher_topk": targets.topk, "curve": progress["curve"]}


def _train(student, layers, targets: TeacherTargets, config: DistillConfig, params: dict[str, nn.Parameter],
           optimizer, scheduler, start: int, total: int, progress: dict, fp: dict, device, callback,
           elapsed: Callable[[], float]) -> None:
    t0, tokens0 = time.perf_counter(), progress["tokens"]
    what = "+".join(config.train)
    with layer_outputs(layers, enabled=config.hidden_weight > 0) as captured:
        for step in (bar := tqdm(range(start, total), initial=start, total=total, leave=False)):
            bar.set_description(f"distill {what} (step {step + 1}/{total})")
            ids, mask, teacher = targets.batch(batch_indices(config.seed, step, targets.windows, config.batch_size),
                                               device)
            captured.clear()
            logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V]
            loss, kl = distill_loss(logits, captured, teacher, mask, config.temperature, config.hidden_weight)
            loss.backward()
            value = float(loss.detach())
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress["tokens"] += int(mask.sum())
            progress["seconds"] = elapsed()
            acc = progress["acc"]
            acc[0], acc[1] = acc[0] + value, acc[1] + 1
            if (step + 1) % config.log_every == 0 or step + 1 == total:
                progress["curve"].append({"step": step + 1, "loss": acc[0] / acc[1], "lr": lr})
                acc[0], acc[1] = 0.0, 0
            rate = (progress["tokens"] - tokens0) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{value:.4f}", kl=f"{kl:.4f}", tok_s=f"{rate:.0f}")
            if config.checkpoint_dir and ((step + 1) % config.every == 0 or step + 1 == total):
                save_state(config.checkpoint_dir, _state(step + 1, fp, params, optimizer, scheduler, progress))
            if callback is not None:
                callback(step + 1, {"model": student, "loss": value, "kl": kl})
    logger.info("distill: %d steps, %d tokens, %.1f s", total - start, progress["tokens"] - tokens0,
                time.perf_counter() - t0)


def _state(step: int, fp: dict, params: dict[str, nn.Parameter], optimizer, scheduler, progress: dict) -> dict:
    return {"fingerprint": normalise(fp), "step": step,
            "trainable": {n: p.detach().cpu().clone() for n, p in params.items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "progress": progress}


@torch.no_grad()
def _restore(state: dict, params: dict[str, nn.Parameter], optimizer, scheduler) -> int:
    for name, p in params.items():
        p.copy_(state["trainable"][name].to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


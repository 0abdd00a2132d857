"""`moeprune calibrate`: checkpoint + calibration text -> `ExpertStats` file.

Order of work (every check that can fail runs before the model is loaded): output path, checkpoint and adapter
(config only), calibration options, tokenizer, every calibration set read, tokenised and sampled; then the model
is loaded (fully, or lazily one decoder layer at a time), the sets are sharded across data-parallel ranks,
collected layer by layer, reduced across ranks, and rank 0 writes the file atomically.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from moeprune import __version__
from moeprune.calibration.data import CalibConfig, CalibSet, CalibSource, build_sets
from moeprune.calibration.distributed import all_reduce_stats, current_rank, rank_device, shard
from moeprune.calibration.session import Decide, collect
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.load import load_model
from moeprune.io.stock import compute_dtype, config_dtype, say_compute_dtype
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.stats.routed import default_probe_stride
from moeprune.stats.store import ExpertStats, check_stats_output

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class CalibrateOptions:
    """Everything `calibrate` needs besides the model; validated on construction."""

    calib: tuple[str, ...]
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str = "text"
    chat_template: bool = False
    tokenizer: str | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"
    lazy: bool | None = None  # None: layer by layer only when the model does not fit (`io.fit.choose_lazy`)
    probe_stride: int | None = None  # every-expert output probes on 1 token in N (merge grouping); None: ⌈8E/k⌉
    held_out: int = 8  # windows per set kept apart from calibration, for the quality figure after a prune

    def __post_init__(self) -> None:
        if self.probe_stride is not None and self.probe_stride < 1:
            raise MoePruneError(f"--probe-stride must be >= 1, got {self.probe_stride}.")
        if self.held_out < 0:
            raise MoePruneError(f"--held-out must be >= 0, got {self.held_out}.")
        if self.batch_size < 1:
            raise MoePruneError(f"--batch-size must be >= 1, got {self.batch_size}.")
        object.__setattr__(self, "dtype", compute_dtype(self.dtype, self.device))  # "auto" on a CPU may be float32
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise MoePruneError(f"--device {self.device}: no CUDA device is visible; use --device cpu.")

    def calib_config(self) -> CalibConfig:
        return CalibConfig(tuple(CalibSource.parse(c) for c in self.calib), samples=self.samples,
                           seq_len=self.seq_len, seed=self.seed, text_field=self.text_field,
                           chat_template=self.chat_template, held_out=self.held_out)


def load_tokenizer(model_path: Path, tokenizer: str | None):
    from transformers import AutoTokenizer

    where = Path(tokenizer).expanduser() if tokenizer else model_path
    hint = "" if tokenizer else " or pass --tokenizer PATH (a folder holding the model's tokenizer files)"
    if not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise MoePruneError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {where}; copy the model's "
                            f"tokenizer there{hint}.")
    try:
        tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MoePruneError(f"cannot load a tokenizer from {where}: {e}. Copy the tokenizer files there{hint}.") from e
    if len(tok) < 2:
        raise MoePruneError(f"the tokenizer in {where} has an empty vocabulary; copy the model tokenizer there{hint}.")
    return tok


def prepare(model: str | Path, opts: CalibrateOptions) -> tuple[Checkpoint, MoEAdapter, list[CalibSet]]:
    """All cheap checks and the tokenised calibration sets; nothing heavy is loaded."""
    cfg = opts.calib_config()
    ckpt = Checkpoint.open(model)
    adapter = get_adapter(ckpt.config, weight_keys=ckpt.names())
    sets = build_sets(cfg, load_tokenizer(ckpt.path, opts.tokenizer))
    stored = config_dtype(ckpt.config)
    say_compute_dtype(opts.dtype, None if stored is None else str(stored).removeprefix("torch."))
    for s in sets:
        logger.info("calibration set %r: %d sequences x %d tokens (%d real tokens) from %s", s.name,
                    s.input_ids.shape[0], s.input_ids.shape[1], s.tokens, s.source)
    return ckpt, adapter, sets


def calibrate(model: str | Path, opts: CalibrateOptions, out: str | Path | None = None, *,
              overwrite: bool = False, decide: Decide | None = None,
              sets: list[CalibSet] | None = None) -> ExpertStats:
    """Run calibration and return the statistics (written to `out` by rank 0 when given). `sets` = the
    tokenised sets when the caller has them already (`prepare`)."""
    out_path = check_stats_output(out, overwrite) if out is not None else None
    if sets is None:
        ckpt, _, sets = prepare(model, opts)
    else:
        ckpt = Checkpoint.open(model)
    rank = current_rank()
    if decide is not None and rank.world > 1:
        raise MoePruneError("prune-as-you-go and NAEE choose experts from one process's statistics; run them "
                            "without torchrun (or calibrate with torchrun, then plan from the statistics file).")
    with quiet_unless_main(rank.is_main):
        model_obj, layer_context = _load(ckpt, opts)
        stats = calibrate_model(model_obj, sets, opts, source=ckpt.path, decide=decide, layer_context=layer_context)
    if out_path is not None and rank.is_main:
        stats.save(out_path)
        logger.info("statistics written to %s (%d sets, %d MoE layers)", out_path, len(sets), len(stats.layers))
    return stats


def calibrate_model(model_obj, sets: list[CalibSet], opts: CalibrateOptions, *, source: str | Path,
                    decide: Decide | None = None, layer_context=None) -> ExpertStats:
    """Routed statistics of an in-memory model (e.g. as earlier stages of a recipe left it), this rank's shard of
    `sets`, reduced across data-parallel ranks."""
    rank = current_rank()
    opts = dataclasses.replace(opts, device=rank_device(opts.device))  # under torchrun: this rank's GPU
    adapter = get_adapter(model_obj.config, model=model_obj)
    result = collect(model_obj, adapter, shard(sets, rank), device=opts.device, batch_size=opts.batch_size,
                     layer_context=layer_context, decide=decide, probe_stride=opts.probe_stride)
    all_reduce_stats(result.stats, opts.device if opts.device.startswith("cuda") else "cpu")
    routing = dataclasses.asdict(adapter.routing())
    return ExpertStats(
        adapter.model_type, adapter.num_experts, adapter.top_k, adapter.moe_layers(), result.router_sha256,
        result.stats,
        {"routing": routing, "model": str(source), "moeprune_version": __version__, "world_size": rank.world,
         "probe_stride": opts.probe_stride or default_probe_stride(adapter.num_experts, adapter.top_k),
         "dtype": str(model_obj.get_input_embeddings().weight.dtype).removeprefix("torch."),  # computed in
         "calibration": {s.name: [s.describe()] for s in sets}, "dropped_as_you_go": result.dropped},
    )


@contextmanager
def quiet_unless_main(is_main: bool) -> Iterator[None]:
    """One voice: on non-main ranks the package logger says only warnings and tqdm bars stay off, for the
    duration of the calibration only (the process's logger level and environment are restored after)."""
    if is_main:
        yield
        return
    level, before = logger.level, os.environ.get("TQDM_DISABLE")
    logger.setLevel("WARNING")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        logger.setLevel(level)
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def _load(ckpt: Checkpoint, opts: CalibrateOptions):
    from moeprune.io.fit import choose_lazy

    if choose_lazy(opts.lazy, ckpt, opts.dtype):
        from moeprune.io.lazy import load_lazy

        lazy = load_lazy(ckpt.path, dtype=opts.dtype, device=opts.device)
        return lazy.model, lazy.layer
    return load_model(ckpt.path, dtype=opts.dtype), None

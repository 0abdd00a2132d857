"""Expert removal straight on safetensors shards, without instantiating the model.

Every tensor is classified by the adapter (`classify_key`) on its on-disk name:
    expert  `...layers.L.mlp.experts.J.<w>`  -> dropped, or renamed to the new index of J
    fused   `...layers.L.mlp.experts.<w>` [E, ...] -> rows K of dim 0     (gpt-oss on disk)
            or flat [E·I, H]                       -> row blocks K of I rows (DBRX `experts.mlp.w1/v1/w2`)
    router  `...layers.L.mlp.gate.<w>` [E, ...]   -> rows K of dim 0     (weight, bias, correction bias)
            or [1, ..., 1, E]                     -> entries K of the last dim  (ERNIE's [1, E] correction bias)
    other                                          -> copied unchanged
Z extra router classes without expert weights (LongCat-Flash's zero experts) are kept after the K experts:
router and fused tensors with E + Z rows keep rows K ∪ [E, E + Z), and per-expert keys of index E + z (the
unused gate/up rows transformers saves for them) become K + z (`MoEAdapter.keep_rows`).
Bytes are copied range by range (rows of dim 0 are contiguous; so are the entries of a [1, ..., 1, E] tensor,
whose memory is that of [E]), so the result is bit-identical to slicing the tensors, works for every dtype, and
memory stays at one copy buffer whatever the shard size. Output shards are re-packed to `max_shard_size`.

Quantized checkpoints keep their format (`io/quant.py`): an FP8 expert's `experts.J.<proj>.weight_scale_inv` is an
"expert" key like its weight, so it is dropped or renamed with expert J; MXFP4 `experts.<proj>_blocks` [E, ...]
and `_scales` [E, ...] are "fused" and lose the same rows of dim 0 as the other fused tensors. config.json keeps
its quantization_config unchanged. A router quantized in blocks cannot lose rows (a scale covers b0 experts'
rows at once) and is refused; the written tensors are re-checked against their scales before any byte is written,
and the scale values are checked before anything is planned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import INDEX_NAME, Checkpoint
from moeprune.io.quant import FP8_WEIGHT, SCALE_ENDS
from moeprune.io.safetensors_io import OutTensor, TensorEntry, row_ranges, write_file
from moeprune.models.base import MoEAdapter, shape_expert_axis
from moeprune.select.plan import PrunePlan


@dataclass
class StreamingResult:
    bytes_in: int
    bytes_out: int
    files: list[str]


def plan_tensors(ckpt: Checkpoint, adapter: MoEAdapter, plan: PrunePlan) -> list[OutTensor]:
    """What to write: each surviving tensor with its (possibly new) name, shape and source byte ranges."""
    E = adapter.num_experts
    quant = ckpt.quantization
    Z = adapter.extra_classes
    new_index = {layer: {old: new for new, old in enumerate([*kept, *range(E, E + Z)])}
                 for layer, kept in plan.kept_experts.items()}  # extra classes E + z -> K + z
    problem = quantized_router(ckpt, adapter)
    if problem:
        raise MoePruneError(problem)
    seen: dict[int, set[str]] = {layer: set() for layer in plan.layers}
    out: list[OutTensor] = []
    for e in ckpt.entries:
        role = adapter.classify_key(e.name)
        if role.kind == "expert":
            seen[role.layer].add("experts")
            j = new_index[role.layer].get(role.expert)
            if j is not None:
                out.append(OutTensor(role.renamed(j), e.dtype, e.shape, e.file, ((e.begin, e.end),)))
            continue
        if role.kind in ("fused", "router"):
            seen[role.layer].add("experts" if role.kind == "fused" else "router")
            out.append(_rows(e, plan.kept_experts[role.layer], E, Z, flat=role.kind == "fused"))
            continue
        out.append(OutTensor(e.name, e.dtype, e.shape, e.file, ((e.begin, e.end),)))
    missing = {layer: {"experts", "router"} - parts for layer, parts in seen.items() if parts != {"experts", "router"}}
    if missing:
        raise MoePruneError(
            f"checkpoint layout not recognised by the {adapter.family} adapter: no {missing} tensors found for "
            f"those MoE layers (looked for '.{'|'.join(adapter.disk_block_names)}.{adapter.experts_name}.' and "
            f"'.{adapter.router_name}.'). Use the in-memory path (without --streaming) or fix the adapter."
        )
    if quant is not None:  # every kept weight still has its scale, of the right shape (a bug here would be silent)
        quant.check_headers(out)
    return out


def quantized_router(ckpt: Checkpoint, adapter: MoEAdapter) -> str | None:
    """Why experts cannot be removed on these shards, or None: a router quantized in blocks cannot lose rows (one
    scale covers b0 experts' rows at once). Headers only: checked before any work (`ExpertStage.shards_problem`)."""
    if ckpt.quantization is None:
        return None
    for e in ckpt.entries:
        if (e.dtype == FP8_WEIGHT or e.name.endswith(SCALE_ENDS)) and adapter.classify_key(e.name).kind == "router":
            return (f"{e.name} is a quantized router tensor ({e.dtype} {list(e.shape)}): its block scales cover "
                    "several experts' rows, so experts cannot be removed from it on the shards. Keep routers "
                    "unquantized (quantization_config.modules_to_not_convert) or use the in-memory path.")
    return None


def _rows(e: TensorEntry, kept: list[int], num_experts: int, extra: int = 0, flat: bool = False) -> OutTensor:
    """The kept experts of `e` along its experts axis (`shape_expert_axis`): dim 0, or the last dim of
    [1, ..., 1, E]; every axis before it has one entry, so expert j's bytes are the j-th of E equal slices.
    A tensor with E + Z entries there (Z = `extra` router classes) keeps its last Z after the kept experts.
    `flat` (expert tensors): dim 0 may also be E·I rows, I per expert (DBRX [E·I, H]): the same equal slices."""
    n = num_experts
    axis = shape_expert_axis(tuple(e.shape), n)
    if axis is None and flat and len(e.shape) == 2 and e.shape[0] % num_experts == 0:
        shape = (len(kept) * (e.shape[0] // num_experts), e.shape[1])  # [K·I, H]
        return OutTensor(e.name, e.dtype, shape, e.file, tuple(row_ranges(e, kept, num_experts)))
    if axis is None and extra:
        n = num_experts + extra
        axis = shape_expert_axis(tuple(e.shape), n)
        kept = [*kept, *range(num_experts, n)]  # [K + Z]
    if axis is None:
        raise MoePruneError(f"{e.name}: expected {num_experts} experts on dim 0 (or a [1, ..., 1, {num_experts}] "
                            f"tensor), found shape {e.shape}.")
    shape = (*e.shape[:axis], len(kept), *e.shape[axis + 1:])
    return OutTensor(e.name, e.dtype, shape, e.file, tuple(row_ranges(e, kept, n)))


def pack_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy packing in checkpoint order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def apply_plan_streaming(
    ckpt: Checkpoint, adapter: MoEAdapter, plan: PrunePlan, out_dir: Path, max_shard_bytes: int
) -> StreamingResult:
    """Write the pruned weights and config.json into `out_dir` (an empty temporary folder)."""
    plan.validate(adapter)
    if ckpt.quantization is not None:
        ckpt.quantization.check_values(ckpt.entries)  # reads the scale tensors only
    tensors = plan_tensors(ckpt, adapter, plan)
    shards = pack_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(t.nbytes for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="streaming apply", leave=False) as bar:
        for name, shard in zip(names, shards, strict=True):
            write_file(out_dir / name, shard)
            bar.update(sum(t.nbytes for t in shard))
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard},
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
    config = json.loads(json.dumps(ckpt.config_dict))
    adapter.set_config_dict_experts(config, plan.kept_count)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return StreamingResult(ckpt.total_bytes, total, names)

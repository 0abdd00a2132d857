"""Write an export: the checkpoint with every plan of a chain applied, its recipe, plans, statistics and report.

    OUT/                        written atomically (temporary sibling, renamed when complete)
      config.json, *.safetensors   stock layout; config.json["moeprune"] = provenance; written in memory
                                   (load, apply_chain, save_pretrained), on the shards (expert removal, --streaming)
                                   or layer by layer (lazy, or --streaming with merges/neurons; io/layered_export.py)
      tokenizer and side files     copied from the source
      moeprune_recipe.json         {"format": "moeprune.recipe/1", "stages": [{kind, method, ratio, ..., plan}]}
      moeprune_plans/N-KIND.json   stage N's plan; N-KIND.stats.safetensors its routed statistics (if any)
      moeprune_report.json         what changed: the final state, then one report per stage ("stages")
Older readers' names are kept too: a stage whose kind occurs once in the chain also saves its plan as
moeprune_merge.json or moeprune_neurons.json (`Stage.legacy_plan_name`; expert removal has none, its plan is the
report's kept_experts), and a run that collected exactly one routed statistics file also saves it as
moeprune_stats.safetensors.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from moeprune import __version__
from moeprune.errors import MoePruneError
from moeprune.io.atomic import atomic_dir
from moeprune.io.checkpoint import STATS_NAME, Checkpoint
from moeprune.io.load import load_model, match_disk_dtypes
from moeprune.io.report import write_json_atomic
from moeprune.io.sizes import parse_size
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.base import MoEAdapter
from moeprune.pipeline.recipe import PLANS_DIR, RECIPE_FORMAT, RECIPE_NAME, REPORT_NAME, Chain, plan_file
from moeprune.stages.base import apply_chain, original_experts
from moeprune.stats.store import ExpertStats


@dataclass
class ApplyResult:
    out: Path
    report: dict


def export(ckpt: Checkpoint, adapters: list[MoEAdapter], chain: Chain, out: Path, *, streaming: bool = False,
           lazy: bool = False, max_shard_size: str | int = "5GB", options: list[dict] | None = None,
           stats: list[list[ExpertStats]] | None = None, into: Path | None = None, fused=None) -> ApplyResult:
    """Apply `chain` (validated: `adapters` = the model before each plan and after the last) and save to `out`.

    How (`export_mode`): `streaming` with stages that all edit shards -> byte copies, stage by stage; `streaming`
    with other stages (merges, neurons) or `lazy` -> layer by layer (`io/layered_export.py`); else in memory.
    `options` are the recipe's stage options (None when plans are replayed), `stats` each stage's statistics.
    `into`: the temporary folder to write (the caller renames it to `out`; else `atomic_dir(out)` here), `fused`:
    the `pipeline.fused.FusedExport` whose planning pass already wrote some layers into it."""
    max_bytes = parse_size(max_shard_size)
    prov = provenance(chain, ckpt.path)
    mode = export_mode(chain, streaming, lazy)
    if mode == "layered":  # the whole-model apply checks the model; layer by layer, check the plans first
        for n, ((stage, plan), adapter) in enumerate(zip(chain, adapters, strict=False), 1):
            try:
                stage.check_apply(None, adapter, plan)
            except MoePruneError as e:
                raise MoePruneError(f"plan {n} ({stage.kind}, {plan.method}): {e}") from None
    notes = []
    with nullcontext(into) if into is not None else atomic_dir(out) as tmp:
        if mode == "streaming":
            _apply_shards(ckpt, chain, tmp, max_bytes)
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["moeprune"] = prov
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        elif mode == "layered":
            from moeprune.io.layered_export import export_layered

            result = (fused.finish(chain, adapters, prov) if fused is not None
                      else export_layered(ckpt, chain, adapters, tmp, max_bytes, prov))
            if result.dequantized:
                notes.append(f"the source is quantized ({result.dequantized}); this export was written "
                             "layer by layer, dequantized, without quantization_config")
        else:
            model = load_model(ckpt.path, dtype="auto")
            match_disk_dtypes(model, ckpt.torch_dtypes())
            apply_chain(model, chain)
            model.config.moeprune = prov
            model.save_pretrained(tmp, max_shard_size=max_bytes)
            del model
        last_stage, last_plan = chain[-1]
        # the checkpoint's own model_type (a vision-language model's, not its text decoder's: qwen3_vl_moe)
        last_stage.finish_export(tmp, getattr(adapters[0].root_config, "model_type", None) or adapters[0].model_type,
                                 last_plan)
        bytes_after = Checkpoint.open(tmp).total_bytes
        ckpt.copy_side_files(tmp)
        _write_plans(tmp, chain, options, stats or [[] for _ in chain])
        report = build_report(ckpt, adapters, chain, mode, bytes_after)
        if notes:
            report["notes"] = notes
        if mode == "layered":
            report["layers_written_while_planning"] = result.written_while_planning
        write_json_atomic(tmp / REPORT_NAME, report)
    logger.info("wrote %s (%.1f%% of the original weight bytes)", out, 100 * bytes_after / ckpt.total_bytes)
    return ApplyResult(out, report)


def export_mode(chain: Chain, streaming: bool, lazy: bool) -> str:
    """"streaming" (byte copies on the shards), "layered" (one decoder layer at a time) or "in-memory". A model
    that does not fit (`lazy`) whose every stage is expert removal is edited on the shards: no tensor is even
    decoded, kept bytes stay bit-identical and a quantized checkpoint keeps its format."""
    if (streaming or lazy) and all(stage.applies_to_shards for stage, _ in chain):
        return "streaming"
    return "layered" if streaming or lazy else "in-memory"


def _apply_shards(ckpt: Checkpoint, chain: Chain, tmp: Path, max_bytes: int) -> None:
    """Stage by stage on the safetensors shards; intermediate checkpoints live in a sibling temporary folder."""
    with tempfile.TemporaryDirectory(prefix=".moeprune-stages-", dir=tmp.parent) as scratch:
        current = ckpt
        for n, (stage, plan) in enumerate(chain, 1):
            dst = tmp if n == len(chain) else Path(scratch) / str(n)
            dst.mkdir(exist_ok=True)
            stage.apply_shards(current, get_adapter(current.config, weight_keys=current.names()), plan, dst, max_bytes)
            if n < len(chain):
                current = Checkpoint.open(dst)


def _write_plans(tmp: Path, chain: Chain, options: list[dict] | None, stats: list[list[ExpertStats]]) -> None:
    (tmp / PLANS_DIR).mkdir()
    kinds = [stage.kind for stage, _ in chain]
    entries = []
    for n, ((stage, plan), stage_stats) in enumerate(zip(chain, stats, strict=True), 1):
        name = plan_file(n, stage)
        plan.save(tmp / name)
        if stage.legacy_plan_name and kinds.count(stage.kind) == 1:
            plan.save(tmp / stage.legacy_plan_name)
        for k, st in enumerate(stage_stats):
            st.save(tmp / name.replace(".json", f".stats{k or ''}.safetensors"))
        entry = dict(options[n - 1]) if options else {"kind": stage.kind, "method": plan.method, "ratio": plan.ratio}
        entries.append(entry | {"plan": name})
    routed = [st for stage_stats in stats for st in stage_stats]
    if len(routed) == 1:
        routed[0].save(tmp / STATS_NAME)
    write_json_atomic(tmp / RECIPE_NAME, {"format": RECIPE_FORMAT, "stages": entries})


def provenance(chain: Chain, source: Path) -> dict:
    """Small block stored under "moeprune" in the export's config.json."""
    if len(chain) == 1:
        stage, plan = chain[0]
        return {"version": __version__, **stage.provenance(plan), "source": str(source)}
    return {"version": __version__, "source": str(source),
            "stages": [{"kind": stage.kind, **stage.provenance(plan)} for stage, plan in chain]}


def build_report(ckpt: Checkpoint, adapters: list[MoEAdapter], chain: Chain, mode: str, bytes_after: int) -> dict:
    """The final state at the top (the last stage's method and options), then every stage's own report."""
    stages = []
    for n, (stage, plan) in enumerate(chain, 1):
        stages.append(stage.report(plan, adapters[n - 1], adapters[n]) | {"plan": plan_file(n, stage)})
    top = {"moeprune_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "source": str(ckpt.path), "model_type": adapters[0].model_type, "apply_mode": mode}
    for r in stages:
        top.update({k: v for k, v in r.items() if k not in ("stage", "plan")})
    first, last = adapters[0], adapters[-1]
    top["num_experts_before"], top["num_experts_after"] = first.num_experts, last.num_experts
    if any(stage.survivors(plan) is not None for stage, plan in chain):
        kept = original_experts(chain, first.moe_layers(), first.num_experts)
        top["kept_experts"] = {str(k): v for k, v in sorted(kept.items())}
        top["dropped_experts"] = {str(k): [j for j in range(first.num_experts) if j not in set(v)]
                                  for k, v in sorted(kept.items())}
    else:
        top["kept_experts"] = None
    top["weight_bytes_before"], top["weight_bytes_after"] = ckpt.total_bytes, bytes_after
    if len(chain) > 1:
        top["recipe"] = " → ".join(stage.describe(plan) for stage, plan in chain)
    top["stages"] = stages
    return top



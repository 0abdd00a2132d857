"""Weight-only integer quantization as a stage: `{method: quantize, scheme: w4a16, algorithm: rtn|gptq}`
(`moeprune quantize MODEL --scheme w4a16 --algorithm gptq --calib NAME=PATH --out DIR`).

    plan       = QuantPlan (quant/plan.py): (q, s, z) of every quantized matrix, by RTN or GPTQ (quant/run.py);
                 GPTQ runs the calibration engine layer by layer, each routed expert on its own routed tokens
    apply      = Ŵ = (q − z)·s written into the model's weights (shapes and config unchanged)
    export     = the saved folder rewritten as a compressed-tensors checkpoint (quant/export.py), so the stage must be
                 a recipe's last
    reference  = the same Ŵ written into the ORIGINAL model's slots (so verify compares the stock reload with the
                 original holding exactly the values the checkpoint stores)
`bits` (optional) sets the routed experts' width per MoE layer ({layer: bits}) or per expert ({layer: {expert:
bits}}). Shared experts and attention (`parts`) use the scheme's width.
Mixed precision (`avg_bits` or `max_bytes`, with `allocate` pmq|camera, `granularity` layer|expert, `widths`): the
stage fills `bits` itself (quant/mixed.py): budget checked against the shapes in `check` (before any calibration),
loss table from the calibration engine's routed statistics (pmq) or neuron statistics (camera) and the stage's own
RTN errors, milp allocation, then RTN/GPTQ at those widths; the report records the allocation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from moeprune.errors import MoePruneError
from moeprune.io.stock import config_dtype
from moeprune.log import logger
from moeprune.models.base import MoEAdapter
from moeprune.quant.mixed import MixedSpec, costs_and_budget, mixed_spec
from moeprune.quant.plan import QUANT_FORMAT, QuantPlan
from moeprune.quant.rtn import dequantize
from moeprune.quant.scheme import OPTIONAL_PARTS, QuantScheme, check_bits, scheme_named
from moeprune.quant.targets import Target, find_targets, weight_of
from moeprune.stages.base import Need, Stage, StageOptions, config_copy, register_stage

ALGORITHMS = ("rtn", "gptq")
LOADABLE = ("transformers 5 (from_pretrained with compressed-tensors installed) decompresses it at load; vLLM serves "
            "4- and 8-bit compressed-tensors experts")
MIXED = ("routed experts use several widths: transformers 5.24 decodes every expert with ONE config group "
         "(get_experts_scheme), so stock from_pretrained gives wrong weights where the widths differ; "
         "moeprune.load_model decompresses it module by module (quant/load.py); vLLM applies one scheme per fused MoE "
         "layer, so per-layer widths are its to serve and per-expert widths inside a layer are not servable there")


@dataclass(frozen=True)
class QuantizeOptions(StageOptions):
    ratio: float = 0.0  # nothing is removed; a given ratio is refused (`Stage.parse`)
    scheme: str = "w4a16"  # w8a16 | w4a16 | w3a16 | w2a16
    algorithm: str = "rtn"  # rtn | gptq
    group_size: int = 128
    symmetric: bool = True
    parts: tuple[str, ...] = ()  # optional parts besides the routed experts: shared_experts, attention
    bits: Any = None  # {layer: bits} or {layer: {expert: bits}} for the routed experts (mixed precision)
    min_tokens: int = 16  # GPTQ: experts with fewer routed calibration tokens fall back to RTN
    damp: float = 0.01  # GPTQ: λ = damp · mean(diag H)
    act_order: bool = False  # GPTQ: columns by decreasing H_jj (static groups)
    avg_bits: float | None = None  # mixed precision: Σ b_e·n_e ≤ avg_bits · Σ n_e over the routed experts
    max_bytes: int | str | None = None  # mixed precision: bytes of the whole checkpoint ("40GB" or an int)
    allocate: str | None = None  # importance of the allocation: pmq | camera (default camera)
    granularity: str | None = None  # layer (default; vLLM serves it) | expert
    widths: tuple[int, ...] | None = None  # widths the allocation may choose (default 2, 3, 4, 8)
    lists: ClassVar[tuple[str, ...]] = ("parts", "widths")

    def given(self) -> dict[str, Any]:
        out = super().given()
        out.pop("ratio", None)
        return out

    @property
    def quant_scheme(self) -> QuantScheme:
        return scheme_named(self.scheme, self.group_size, self.symmetric, tuple(self.parts))

    @property
    def mixed(self) -> MixedSpec | None:
        """The mixed-precision request (None: `bits` or the scheme's width everywhere)."""
        from moeprune.io.sizes import parse_size

        max_bytes = self.max_bytes
        if max_bytes is not None:
            max_bytes = parse_size(max_bytes, "max_bytes")
        return mixed_spec(self.avg_bits, max_bytes, self.allocate, self.granularity, self.widths, self.bits)


def expert_bits(bits: Any, num_experts: int | None, default: int) -> dict[int, dict[int, int]]:
    """The `bits` option as {layer: {expert: bits}} ({} when not given); keys may be strings (JSON / YAML).
    `num_experts` None: only check the values (no model known yet)."""
    if bits is None:
        return {}
    if not isinstance(bits, dict):
        raise MoePruneError(f"bits must map MoE layers to a width ({{3: 4, 5: 8}}) or to per-expert widths "
                            f"({{3: {{0: 4, 1: 8}}}}), got {bits!r}.")
    out: dict[int, dict[int, int]] = {}
    for layer, value in bits.items():
        try:
            layer_i = int(layer)
        except (TypeError, ValueError):
            raise MoePruneError(f"bits: layer {layer!r} is not a layer index.") from None
        if isinstance(value, dict):
            per = {}
            for j, b in value.items():
                if not str(j).isdigit() or (num_experts is not None and int(j) >= num_experts):
                    raise MoePruneError(f"bits: layer {layer_i} expert {j!r} is not one of 0..{num_experts - 1}.")
                per[int(j)] = check_bits(b)
            out[layer_i] = per if num_experts is None else {j: per.get(j, default) for j in range(num_experts)}
        else:
            check_bits(value)
            out[layer_i] = {} if num_experts is None else dict.fromkeys(range(num_experts), value)
    return out


class QuantizeStage(Stage):
    kind = "quantize"
    plan_format = QUANT_FORMAT
    options_type = QuantizeOptions
    takes_ratio = False
    changes_weights = True

    @classmethod
    def methods(cls) -> list[str]:
        return ["quantize"]

    def validate_options(self, o: QuantizeOptions) -> None:
        if o.algorithm not in ALGORITHMS:
            raise MoePruneError(f"algorithm {o.algorithm!r}: choose one of {', '.join(ALGORITHMS)}.")
        unknown = [p for p in o.parts if p not in OPTIONAL_PARTS]
        if unknown:
            raise MoePruneError(f"parts {unknown}: the routed experts are always quantized; add "
                                f"{' and/or '.join(OPTIONAL_PARTS)}.")
        o.quant_scheme  # noqa: B018  (bits, group size, symmetric: refused here)
        if isinstance(o.min_tokens, bool) or not isinstance(o.min_tokens, int) or o.min_tokens < 1:
            raise MoePruneError(f"min_tokens {o.min_tokens!r}: a positive number of routed tokens.")
        if isinstance(o.damp, bool) or not isinstance(o.damp, (int, float)) or not 0 <= o.damp < 10:
            raise MoePruneError(f"damp {o.damp!r}: a number >= 0 (relative damping, e.g. 0.01).")
        expert_bits(o.bits, None, o.quant_scheme.bits)
        o.mixed  # noqa: B018  (budget with bits, allocate without a budget, widths: refused here)
        if o.algorithm == "rtn" and (o.act_order or o.damp != 0.01 or o.min_tokens != 16):
            raise MoePruneError("act_order, damp and min_tokens are GPTQ's; drop them or use algorithm gptq.")

    def needs(self, o: QuantizeOptions) -> set[Need]:
        base = {Need.HESSIANS} if o.algorithm == "gptq" else {Need.WEIGHTS}
        spec = o.mixed
        if spec is None:
            return base
        return (base - {Need.WEIGHTS}) | ({Need.ROUTED} if spec.needs_routed() else {Need.NEURONS})

    def final_only(self, o: QuantizeOptions) -> str | None:
        return ("quantize stage writes integer weights that a later stage would have to dequantize and cut again; "
                "quantization must be the recipe's last stage")

    def check(self, o: QuantizeOptions, adapter: MoEAdapter) -> Any:
        from moeprune.io.quant_config import quantization_dict
        from moeprune.models.structure import meta_model
        from moeprune.quant.export import per_expert_on_disk

        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise MoePruneError("quantization writes compressed-tensors checkpoints: pip install "
                                "'compressed-tensors>=0.15' (the `quant` extra: 'moeprune[quant]').") from None
        root = adapter.root_config
        qcfg = quantization_dict(root.to_dict() if hasattr(root, "to_dict") else dict(root))
        if qcfg is not None:
            raise MoePruneError(f"the input is already quantized (quant_method {qcfg.get('quant_method')!r}): "
                                "quantizing its dequantized weights again would compound two rounding errors and the "
                                "export could not say what the original was; quantize the bf16/fp16 checkpoint.")
        if not per_expert_on_disk(adapter):
            raise MoePruneError(f"{adapter.model_type} stores its routed experts fused on disk; compressed-tensors "
                                "packs each expert's projections separately and transformers stacks them at load only "
                                "for families saved per expert (Qwen-MoE, Mixtral, OLMoE, DeepSeek-V2/V3, GLM-4.5, "
                                "...).")
        scheme = o.quant_scheme
        model = meta_model(root)
        for t in self._targets(model, adapter, scheme):
            w = weight_of(model, adapter, t)
            scheme.check_divides(w.shape[-1], f"{t.key} ([{w.shape[0]}, {w.shape[1]}])")
        bits = expert_bits(o.bits, adapter.num_experts, scheme.bits)
        bad = sorted(set(bits) - set(adapter.moe_layers()))
        if bad:
            raise MoePruneError(f"bits names layers {bad}, which are not MoE layers ({adapter.moe_layers()}).")
        spec = o.mixed
        if spec is not None:  # a budget below the smallest model is refused from the shapes, before any work
            costs_and_budget(spec, model, adapter, scheme.group_size, scheme.symmetric, _config_dtype(root).itemsize)
        return config_copy(adapter)

    def lazy_reload_problem(self, o: QuantizeOptions, adapter: MoEAdapter) -> str | None:
        """Routed experts at several widths (a budget that may choose several, or `bits` that do) cannot be read back
        layer by layer: transformers' compressed-tensors expert decoder takes one config group (quant/load.py)."""
        spec = o.mixed
        if spec is not None:
            several = len(spec.widths) > 1
        else:
            bits = expert_bits(o.bits, adapter.num_experts, o.quant_scheme.bits)
            widths = {b for layer in adapter.moe_layers() for b in
                      bits.get(layer, {}).values() or [o.quant_scheme.bits]}
            several = len(widths) > 1
        if not several:
            return None
        return ("its export stores routed experts at several widths, which layer-by-layer loading cannot decode "
                "(transformers' compressed-tensors expert decoder takes one config group for every expert), so "
                "the export could not be verified or scored layer by layer; run without --lazy, or pass --no-verify "
                "and --held-out 0 (verify it later on a machine that loads it whole), or give one width (--widths "
                "4)")

    @staticmethod
    def _targets(model, adapter: MoEAdapter, scheme: QuantScheme) -> list[Target]:
        return find_targets(model, adapter, scheme.parts)

    # ------------------------------------------------------------------ plans
    def plan(self, o: QuantizeOptions, ctx) -> QuantPlan:
        from moeprune.models import get_adapter
        from moeprune.quant.run import quantize_model

        if o.algorithm == "gptq" and (ctx.calib is None or ctx.sets is None):
            raise MoePruneError("GPTQ needs calibration text: pass --calib NAME=PATH (or use --algorithm rtn).")
        scheme = o.quant_scheme
        spec = o.mixed
        store = _stored_dtype(ctx.ckpt)
        routed = ctx.routed_stats().combined() if spec is not None and spec.needs_routed() else None

        calib = ctx.calib
        dtype = calib.dtype if calib is not None and o.algorithm == "gptq" else "auto"
        device = calib.device if calib is not None else "cpu"
        context = None
        if ctx.lazy:
            lazy, context = ctx.lazy_model(dtype=dtype)
            model = lazy.model
        else:
            model = ctx.model(dtype=dtype, device=device)
        adapter = get_adapter(model.config, model=model)
        allocation = None
        if spec is not None:
            allocation = _allocate(spec, scheme, model, adapter, ctx, routed, store, context, dtype, lazy_model=(
                lazy if ctx.lazy else None))
            bits_option = allocation.pop("bits_option")
        else:
            bits_option = o.bits
        bits = expert_bits(bits_option, adapter.num_experts, scheme.bits)

        def bits_of(t: Target) -> int:
            return bits.get(t.layer, {}).get(t.expert, scheme.bits) if t.expert is not None else scheme.bits

        result = quantize_model(model, adapter, scheme, bits_of, algorithm=o.algorithm, sets=ctx.sets,
                                min_tokens=o.min_tokens, damp=o.damp, act_order=o.act_order,
                                batch_size=calib.batch_size if calib is not None else 8, device=device,
                                layer_context=context, store_dtype=store)
        summary = {"fallbacks": sum(len(v) for v in result.fallbacks.values())}
        if result.tokens:
            summary["routed_tokens"] = {str(k): v for k, v in sorted(result.tokens.items())}
        if allocation is not None:
            summary["allocation"] = allocation
        return QuantPlan(scheme, o.algorithm, adapter.num_experts, result.tensors, result.bits, result.parts,
                         result.fallbacks, summary, model_type=adapter.model_type)

    def load_plan(self, raw: dict, source: str) -> QuantPlan:
        return QuantPlan.from_dict(raw, source)

    def next_config(self, plan: QuantPlan, adapter: MoEAdapter) -> Any:
        return config_copy(adapter)

    # ------------------------------------------------------------------ surgery
    @torch.no_grad()
    def apply_layer(self, model, adapter: MoEAdapter, plan: QuantPlan, layer: int) -> None:
        for key, r in plan.tensors.items():
            t = Target.from_key(key, plan.parts[key])
            if t.layer == layer:
                w = weight_of(model, adapter, t)
                w.copy_(dequantize(r.q, r.scale, r.zero, plan.scheme.group_size).to(w.dtype))

    def update_config(self, config: Any, adapter: MoEAdapter, plan) -> None:
        """Nothing in memory: quantization_config is written by the export (`finish_export`)."""

    def finish_export(self, folder: Path, model_type: str, plan: QuantPlan) -> None:
        from moeprune.quant.export import write_compressed

        plan.summary["export"] = write_compressed(folder, plan)

    @torch.no_grad()
    def reference(self, ref, plan: QuantPlan) -> None:
        for key, r in plan.tensors.items():
            t = Target.from_key(key, plan.parts[key])
            if not ref.scope([t.layer]):
                continue
            w_hat = dequantize(r.q, r.scale, r.zero, plan.scheme.group_size)
            if t.expert is not None:
                ref.write_expert(t.layer, t.expert, {t.name: w_hat})
            else:
                target = ref.adapter.decoder_layers(ref.model)[t.layer].get_submodule(t.name).weight
                target.copy_(w_hat.to(target.dtype))

    # ------------------------------------------------------------------ reports
    def provenance(self, plan: QuantPlan) -> dict:
        return {"method": "quantize", "scheme": plan.scheme.to_dict(), "algorithm": plan.algorithm,
                "quant_plan_sha256": plan.sha256()}

    def report(self, plan: QuantPlan, before: MoEAdapter, after: MoEAdapter) -> dict:
        layer_bits = plan.layer_bits()
        widths = sorted(set(plan.bits.values()))
        uniform = len({b for k, b in plan.bits.items() if ".expert." in k}) == 1
        return {
            "stage": self.kind, "method": "quantize", "scheme": plan.scheme.to_dict(), "algorithm": plan.algorithm,
            "quant_plan_sha256": plan.sha256(), "quantized_parts": list(plan.scheme.parts),
            "layer_bits": {str(k): v for k, v in layer_bits.items()},
            "expert_bits": {str(k): {str(i): b for i, b in v.items()} for k, v in plan.expert_bits().items()
                            if layer_bits[k] is None},
            "bit_widths": widths, "rtn_fallbacks": {str(k): v for k, v in sorted(plan.fallbacks.items())},
            "quantized_bytes": plan.summary.get("export", {}).get("quantized_tensor_bytes"),
            "num_experts_before": before.num_experts, "num_experts_after": after.num_experts,
            "format": "compressed-tensors pack-quantized", "loadable_by_stock_config": uniform,
            "note": LOADABLE if uniform else MIXED, "allocation": _allocation_report(plan),
        }

    def describe(self, plan: QuantPlan) -> str:
        widths = sorted(set(plan.bits.values()))
        fb = sum(len(v) for v in plan.fallbacks.values())
        return (f"quantize ({plan.algorithm}, {'/'.join(map(str, widths))}-bit, group {plan.scheme.group_size})"
                + (f", {fb} experts by RTN (too few routed tokens)" if fb else "")
                + (f", widths allocated under {a['budget']} ({a['importance']}, per {a['granularity']})"
                   if (a := plan.summary.get("allocation")) else ""))


def _allocation_report(plan: QuantPlan) -> dict | None:
    """The allocation of a mixed-precision plan with the bytes the export actually wrote (None: no budget)."""
    alloc = plan.summary.get("allocation")
    if alloc is None:
        return None
    written = plan.summary.get("export", {}).get("checkpoint_bytes")
    out = dict(alloc) | {"bytes_written": written}
    if "max_bytes" in alloc and written is not None:
        out["within_budget"] = written <= alloc["max_bytes"]
    return out


def _allocate(spec: MixedSpec, scheme: QuantScheme, model, adapter: MoEAdapter, ctx, routed, store: torch.dtype,
              context, dtype: str, lazy_model=None) -> dict:
    """The allocation summary (quant/mixed.py) with the `bits` option it gives under "bits_option"."""
    from moeprune.quant.importance import ImportanceInputs
    from moeprune.quant.mixed import (
        allocation_summary,
        costs_and_budget,
        header_fixed_bytes,
        model_micro_errors,
        solve,
    )

    # first stage: the non-expert bytes from the headers (exact in any dtype mix); after others: from the model
    fixed = header_fixed_bytes(ctx.ckpt, ctx.adapter) if ctx.ckpt is not None and not ctx.previous else None
    costs, budget = costs_and_budget(spec, model, adapter, scheme.group_size, scheme.symmetric, store.itemsize,
                                     fixed)
    neurons = None
    if not spec.needs_routed():
        neurons = _neuron_stats(model, adapter, ctx, context, dtype, lazy_model)
    errors = model_micro_errors(model, adapter, spec.widths, scheme.group_size, scheme.symmetric, store, context)
    result = solve(spec, costs, budget, ImportanceInputs(errors, routed=routed, neurons=neurons))
    summary = allocation_summary(spec, result, costs)
    logger.info("mixed precision (%s): average %.3f bits, predicted loss %.6g", spec.describe(),
                summary["average_bits"], summary["predicted_loss"])
    return {**summary, "bits_option": result.bits_option()}


def _neuron_stats(model, adapter: MoEAdapter, ctx, context, dtype: str, lazy_model):
    """CAMERA-Q's neuron statistics of the model the stage quantizes (as the neuron stage collects them)."""
    if ctx.calib is None or not ctx.sets:
        raise MoePruneError("allocate camera needs neuron statistics: pass --calib NAME=PATH (or allocate pmq).")
    if lazy_model is not None:
        from moeprune.stats.neurons_layered import neuron_stats

        return neuron_stats(ctx, False, lazy=lazy_model if ctx.previous else None,
                            layer_context=context if ctx.previous else None, dtype=dtype)
    from moeprune.stats.neurons import collect_neuron_stats

    return collect_neuron_stats(model, adapter, ctx.sets, gradients=False, batch_size=ctx.calib.batch_size)


def _config_dtype(config) -> torch.dtype:
    """The dtype the config says the weights are stored in (bf16 when it says nothing): sizes before any load."""
    return config_dtype(config) or torch.bfloat16


def _stored_dtype(ckpt) -> torch.dtype:
    """The floating dtype most of the checkpoint's tensors are stored in (the dtype the scales are kept in)."""
    if ckpt is None:
        return torch.bfloat16
    counts = Counter(d for d in ckpt.torch_dtypes().values() if d.is_floating_point and d.itemsize > 1)
    return counts.most_common(1)[0][0] if counts else torch.bfloat16


QUANTIZE = register_stage(QuantizeStage())

"""The transformers internals moeprune relies on, named in one place.

The lazy and non-uniform loaders (`io/lazy.py`, `io/nonuniform.py`) reuse transformers' own loading machinery
(checkpoint-key renaming, the weight converters that fuse per-expert tensors, dtype resolution, init contexts)
instead of re-implementing it. Those pieces are not public API and move between releases, so every one is listed
here: a transformers that lacks one fails with an error that names the symbol and the installed version, and
`tests/test_compat.py` checks the whole list against the installed transformers.

Imported through this module (`from moeprune.compat import NAME`, looked up at first use, so importing moeprune
does not import transformers) — `EXPORTS`, moeprune's name -> (transformers module, attribute there):

    get_model_conversion_mapping          transformers.conversion_mapping.get_model_conversion_mapping
    get_checkpoint_conversion_mapping     transformers.conversion_mapping.* (quant/export.py: per-expert on disk?)
    WeightConverter, WeightRenaming,      transformers.core_model_loading.*
      rename_source_key, convert_and_load_state_dict_in_model,
      revert_weight_conversion            (in-memory names -> on-disk names, as save_pretrained writes them)
    LoadStateDictConfig                   transformers.modeling_utils.LoadStateDictConfig
    get_dtype                             transformers.modeling_utils._get_dtype
    get_hf_quantizer                      transformers.quantizers.auto.get_hf_quantizer (quantized lazy loads)
    Fp8Dequantize                         transformers.integrations.finegrained_fp8.Fp8Dequantize (io/quant_ops.py)
    convert_moe_packed_tensors            transformers.integrations.mxfp4.convert_moe_packed_tensors (io/quant.py)
    get_model_class                       transformers.models.auto.auto_factory._get_model_class
    ContextManagers                       transformers.utils.generic.ContextManagers
    guard_torch_init_functions            transformers.initialization.guard_torch_init_functions
    grouped_linear, grouped_mm_experts_forward, ALL_EXPERTS_FUNCTIONS, use_experts_implementation
                                          transformers.integrations.moe._grouped_linear, .grouped_mm_experts_forward,
                                          .ALL_EXPERTS_FUNCTIONS, .use_experts_implementation (stats/slots.py: the
                                          grouped kernel's steps per (token, slot) pair, and the dispatch forward
                                          it applies to; absent: the collector's one-slot-per-row call)

Used in place, as attributes of transformers objects — `ATTRIBUTES`, checked by the same test:

    Auto*._model_mapping                              io/stock.py (auto_class), io/lazy.py
    PreTrainedModel.get_init_context, ._get_dtype_plan, ._init_weights, .named_non_persistent_buffers,
      .tie_weights(missing_keys=, recompute_mapping=)  io/lazy.py
    HfQuantizer.preprocess_model, .postprocess_model  io/lazy.py (quantized checkpoints, dequantize=True)
    PreTrainedModel._keys_to_ignore_on_load_unexpected  routing/marker.py (extended while load_model reads a dynamic
                                                      routing export, so its marker tensor is not reported)
    PretrainedConfig._experts_implementation          calibration/session.py (eager experts while calibrating);
                                                      also set by benchmarks/calibration_cost.py; read by
                                                      models/dynamic.py (does this implementation skip index E?)

Read off experts modules at run time, never required (absent: routing policies leave weight-0 slots computed):
the eager loop's sentinel (its source holds `num_experts + 1` and `== self.num_experts`) and the grouped_mm /
batched_mm kernels' instance attribute `_is_expert_parallel` (models/dynamic.py: `skips_sentinel`, `sentinel_active`).
"""

from __future__ import annotations

import importlib
from typing import Any

from moeprune.errors import MoePruneError

EXPORTS: dict[str, tuple[str, str]] = {
    "get_model_conversion_mapping": ("transformers.conversion_mapping", "get_model_conversion_mapping"),
    "get_checkpoint_conversion_mapping": ("transformers.conversion_mapping", "get_checkpoint_conversion_mapping"),
    "WeightConverter": ("transformers.core_model_loading", "WeightConverter"),
    "WeightRenaming": ("transformers.core_model_loading", "WeightRenaming"),
    "rename_source_key": ("transformers.core_model_loading", "rename_source_key"),
    "convert_and_load_state_dict_in_model": ("transformers.core_model_loading", "convert_and_load_state_dict_in_model"),
    "revert_weight_conversion": ("transformers.core_model_loading", "revert_weight_conversion"),
    "dot_natural_key": ("transformers.core_model_loading", "dot_natural_key"),
    "MergeModulelist": ("transformers.core_model_loading", "MergeModulelist"),
    "Concatenate": ("transformers.core_model_loading", "Concatenate"),
    "LoadStateDictConfig": ("transformers.modeling_utils", "LoadStateDictConfig"),
    "get_dtype": ("transformers.modeling_utils", "_get_dtype"),
    "get_hf_quantizer": ("transformers.quantizers.auto", "get_hf_quantizer"),
    "Fp8Dequantize": ("transformers.integrations.finegrained_fp8", "Fp8Dequantize"),
    "convert_moe_packed_tensors": ("transformers.integrations.mxfp4", "convert_moe_packed_tensors"),
    "get_model_class": ("transformers.models.auto.auto_factory", "_get_model_class"),
    "ContextManagers": ("transformers.utils.generic", "ContextManagers"),
    "guard_torch_init_functions": ("transformers.initialization", "guard_torch_init_functions"),
    "grouped_linear": ("transformers.integrations.moe", "_grouped_linear"),
    "grouped_mm_experts_forward": ("transformers.integrations.moe", "grouped_mm_experts_forward"),
    "ALL_EXPERTS_FUNCTIONS": ("transformers.integrations.moe", "ALL_EXPERTS_FUNCTIONS"),
    "use_experts_implementation": ("transformers.integrations.moe", "use_experts_implementation"),
    # the model registry, to enumerate the installed MoE families (tiny_families.moe_model_types)
    "CONFIG_MAPPING_NAMES": ("transformers.models.auto.configuration_auto", "CONFIG_MAPPING_NAMES"),
    "model_type_to_module_name": ("transformers.models.auto.configuration_auto", "model_type_to_module_name"),
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": ("transformers.models.auto.modeling_auto",
                                          "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": ("transformers.models.auto.modeling_auto",
                                                   "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES": ("transformers.models.auto.modeling_auto",
                                              "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"),
}
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("transformers", "AutoModelForCausalLM._model_mapping"),
    ("transformers", "AutoModelForImageTextToText._model_mapping"),
    ("transformers", "PreTrainedModel.get_init_context"),
    ("transformers", "PreTrainedModel._get_dtype_plan"),
    ("transformers", "PreTrainedModel._init_weights"),
    ("transformers", "PreTrainedModel.named_non_persistent_buffers"),
    ("transformers", "PreTrainedModel.tie_weights"),
    ("transformers.quantizers", "HfQuantizer.preprocess_model"),
    ("transformers.quantizers", "HfQuantizer.postprocess_model"),
    ("transformers", "PretrainedConfig._experts_implementation"),
)
# every (module, attribute path) moeprune needs from transformers
REQUIRED: tuple[tuple[str, str], ...] = (*EXPORTS.values(), *ATTRIBUTES)

__all__ = ["ATTRIBUTES", "EXPORTS", "REQUIRED", "require", *EXPORTS]


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "(not installed)"
    return getattr(transformers, "__version__", "(unknown version)")


def require(module_name: str, attr: str) -> Any:
    """`module_name.attr` (attr may be a dotted path such as `PreTrainedModel._init_weights`), or a MoePruneError
    naming the missing symbol and the installed transformers version."""
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise _missing(module_name, attr, f"module {module_name} cannot be imported: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise _missing(module_name, attr, f"{module_name} has no {attr}") from e
    return obj


def _missing(module_name: str, attr: str, why: str) -> MoePruneError:
    return MoePruneError(
        f"moeprune needs {module_name}.{attr} from transformers, but transformers {transformers_version()} does not "
        f"have it ({why}). Install a transformers version moeprune supports (see pyproject.toml), or update "
        "src/moeprune/compat.py and the code that uses this symbol."
    )


def __getattr__(name: str) -> Any:
    """`from moeprune.compat import NAME` for every NAME in EXPORTS, looked up when first asked for."""
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return require(*EXPORTS[name])


def __dir__() -> list[str]:
    return sorted({*globals(), *EXPORTS})

"""Lazy loading: calibrate models larger than host memory, one decoder layer in memory at a time.

`load_lazy(path)` builds the stock model exactly as `from_pretrained` does (same class, same init contexts, same
dtype resolution) but with every tensor on the `meta` device, then materialises on CPU everything except the
decoder layers and the output head: embeddings, final norm, rotary embedding, vision tower. `LazyModel.layer(i)`
is a context manager that reads decoder layer i's tensors from the safetensors shards, and moves them back to
`meta` on exit so their memory is freed (putting back a pristine copy of the meta layer, so a layer changed in
memory, e.g. by surgery, is read from the checkpoint again next time). It plugs into the engine as
`run_layers(model, adapter, batches, layer_context=lazy.layer)`; `capture()` needs no layer weights.

Approach: on-disk names differ from in-memory ones in transformers 5 (per-expert `experts.J.gate_proj.weight`
on disk vs fused `experts.gate_up_proj` [E, 2I, H] in memory; Mixtral `block_sparse_moe.experts.J.w1`;
gpt-oss and Qwen3-VL-MoE fused with their own layouts). Rather than re-implementing those conversions, this
module reuses transformers' own loader, whose internals it imports from `moeprune.compat`:
`get_model_conversion_mapping` gives the model's renamings and converters, `rename_source_key` tells which
in-memory tensor each checkpoint key feeds (hence which layer it belongs to), and
`convert_and_load_state_dict_in_model` is called on a partial state dict holding only that layer's keys.
Only they are read, with plain file reads (not mmap, whose touched pages would count as resident memory), and
the loader runs synchronously so each fused tensor's sources are read only when it is built.
Non-persistent buffers (rotary `inv_freq`) are not in the checkpoint: they get their values from the owning
model's `_init_weights`, as in `from_pretrained`. The result equals the eager model bit for bit
(tests/test_lazy.py, all families, float32 and bfloat16).

Fused experts whose converter only stacks per-expert tensors (and concatenates gate and up) are read straight into
their place in the fused parameter instead (`io/lazy_direct.py`: one decoder layer of the 24-layer benchmark
checkpoint 0.57 -> 0.22 s); the rest of the layer goes through transformers' loader.
After a layer is read, the kernel is asked for the next one's bytes (`io/read_ahead.py`: posix_fadvise
WILLNEED on a background thread), so that a cold read overlaps the current layer's compute.

Memory: one layer, plus transformers' conversion temporaries while a fused tensor is built by its converters
(stacking per-expert tensors then concatenating gate and up holds ~1/3 of the layer in two copies at once; none
on the direct read), plus the embeddings.
A layer computed in a wider dtype than stored (bf16 checkpoint, float32 compute) has its tensors built in the stored
dtype and widened once, which gives the same bits with half the bytes copied (`io/lazy_narrow.py`).

The head (`lm_head`) stays on `meta` unless `head=True`: layer-by-layer calibration never computes logits.
Decoder layers are materialised on `device` (default cpu; the engine runs them there anyway), the rest on CPU.

Quantized checkpoints (`io/quant.py`: FP8 block-quantized DeepSeek-V3/Qwen3-FP8/GLM-4.5-FP8, MXFP4 gpt-oss) are
read DEQUANTIZED, exactly as `from_pretrained(..., quantization_config=FineGrainedFP8Config(dequantize=True))` /
`Mxfp4Config(dequantize=True)` reads them: transformers' quantizer is built with `dequantize=True`, it leaves the
meta model plain (nn.Linear, plain experts) and adds its conversions (`Fp8Dequantize` before each per-expert merge,
`Mxfp4Dequantize` for `*_blocks`/`*_scales`), so each layer's scale tensors are grouped with their weights and the
layer arrives in the model's dtype ("auto" = config dtype; bf16 if that would be a float8 storage type). One
deviation: FP8 matrices that end in a partial block (DeepSeek-V3's kv_a_proj_with_mqa) are dequantized by the
format's definition, which transformers gets wrong (`io/quant_ops.py`). Memory stays one layer (plus the float8
copy of the layer's weights while it is dequantized). The model's config loses its quantization_config, as
from_pretrained's does, so the rest of moeprune sees an ordinary model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import INDEX_NAME, Checkpoint
from moeprune.io.kernel_cache import bound_kernel_cache
from moeprune.io.lazy_direct import Piece, plan_direct, read_direct
from moeprune.io.lazy_narrow import copies_only, narrow_params, set_meta_dtypes, widen
from moeprune.io.memory import release_freed_memory, trim
from moeprune.io.quant import is_quantized_dtype
from moeprune.io.quant_ops import fix_quantizer
from moeprune.io.read_ahead import advise_later, byte_ranges, next_layer
from moeprune.io.remote import refuse_lazy
from moeprune.io.safetensors_io import TensorEntry, read_tensor
from moeprune.io.stock import auto_class, parse_dtype, runnable
from moeprune.log import logger
from moeprune.models import get_adapter
from moeprune.models.scratch import scratch
from moeprune.quant.load import refuse_mixed_lazy

REST = -1  # group id of the checkpoint keys that belong to no decoder layer
SYNC_ENV = "HF_DEACTIVATE_ASYNC_LOAD"  # read by transformers' loader at each call


@dataclass
class LazyModel:
    """A stock model whose decoder layers live on `meta` until `layer(i)` materialises one of them."""

    model: nn.Module
    entries: dict[str, TensorEntry] = field(repr=False)  # checkpoint tensor name -> where its bytes are (or a view's
    # tensor with `name`, `dtype` and `read()`: `load_lazy(tensors=...)`)
    layer_prefix: str  # e.g. "model.layers" or "model.language_model.layers"
    keys: dict[int, list[str]] = field(repr=False)  # layer index (or REST) -> checkpoint keys feeding it
    load_config: object = field(repr=False)  # transformers' LoadStateDictConfig (dtype, plan, conversions)
    device: str = "cpu"  # where decoder layers are materialised (and dequantized)
    # layer -> {parameter: (dtype it is read in, its own dtype)}: built narrow, widened once (`io/lazy_narrow.py`)
    narrow: dict[int, dict[str, tuple[torch.dtype, torch.dtype]]] = field(default_factory=dict, repr=False)
    # layer -> {fused parameter: its checkpoint tensors' places}: read straight into place (`io/lazy_direct.py`)
    direct: dict[int, dict[str, list[Piece]]] = field(default_factory=dict, repr=False)
    read_ahead: bool = True  # after reading a layer, ask the kernel for the next one (`io/read_ahead.py`)
    last_read: int | None = field(default=None, repr=False)  # the layer `_read` read last
    ahead: Future | None = field(default=None, repr=False)  # the pending read-ahead advice, if any
    # how many plans of a recipe's chain its tensors already hold: the first plans, when they only select bytes of
    # the shards and the model is read through that view (`StageContext.lazy_model`); the rest is applied per layer
    view_holds: int = 0

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layer_prefix)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer i with its weights read from disk; on exit the pristine meta module (a copy taken before
        loading) is put back, so a layer changed in memory (surgery) is read from the checkpoint again next time."""
        from transformers import PretrainedConfig

        module = self.layers[i]
        configs = {id(v): v for m in module.modules() for v in vars(m).values() if isinstance(v, PretrainedConfig)}
        pristine = copy.deepcopy(module, memo=configs)  # on meta: no memory; configs stay shared with the model
        try:
            own = self._read(i)
            with scratch(own):  # buffers this visit alone uses: surgery may shrink them in place (models/scratch.py)
                yield module
        finally:
            module.to("meta")  # each parameter's storage is swapped for a meta tensor: the CPU copy is freed
            self.layers[i] = pristine
            trim()  # and the allocator gives the freed pages back (io/memory.py)

    def materialise(self) -> nn.Module:
        """Every decoder layer read from disk for good: the whole stock model, in eval mode."""
        for i in range(len(self.layers)):
            self._read(i)
        return self.model.eval()

    def _read(self, i: int) -> list[torch.Tensor]:
        """Decoder layer i's tensors from the shards: fused experts read straight into place where that gives
        transformers' result (`io/lazy_direct.py`), the rest through transformers' loader; narrow-read parameters
        widened after. Then the next layer's bytes are asked for (`io/read_ahead.py`). Returns the parameters read
        straight into buffers of their own (still in place after widening)."""
        plan = self.narrow.get(i, {})
        set_meta_dtypes(self.model, ((name, d[0]) for name, d in plan.items()))
        done, made = read_direct(self.model, self.direct.get(i, {})) if self.device == "cpu" else (set(), [])
        load_keys(self, [k for k in self.keys.get(i, []) if k not in done], f"{self.layer_prefix}.{i}",
                  device=self.device)
        widen(self.model, ((name, d[1]) for name, d in plan.items()))
        if self.read_ahead and (nxt := next_layer(self.last_read, i, len(self.layers))) is not None:
            self.advise(nxt)
        self.last_read = i
        live = {id(p) for p in self.layers[i].parameters()}
        return [p for p in made if id(p) in live]

    def advise(self, i: int) -> None:
        """Ask the kernel for decoder layer i's bytes in the background (`io/read_ahead.py`)."""
        self.ahead = advise_later(byte_ranges(self.entries[k] for k in self.keys.get(i, ())))

    def layer_bytes(self, i: int) -> int:
        """Bytes decoder layer i occupies once materialised."""
        return sum(t.numel() * t.element_size() for t in self.layers[i].state_dict().values())


def load_lazy(path: str | Path, dtype: str = "auto", *, head: bool = False, config=None, prepare=None,
              device: str = "cpu", tensors: list | None = None, read_ahead: bool = True) -> LazyModel:
    """Build the model on `meta` and materialise all but its decoder layers (and head, unless `head`) on CPU.

    `dtype` is resolved as in `io.load.load_model` ("auto" = the checkpoint's dtype), so every materialised
    tensor has the dtype the eager model would have. `config` replaces the checkpoint's config object;
    `prepare(model)` may reshape meta parameters before anything is read (non-uniform expert widths).
    `device`: where `layer(i)` materialises (and dequantizes) decoder layers.
    `tensors`: a view of the checkpoint replacing its tensors — objects with `name`, `dtype` and `read()`, e.g. the
    `OutTensor`s of `surgery.streaming.plan_tensors` (a pruned checkpoint's tensors as byte ranges of the original
    shards), with `config` the matching config; only those byte ranges are ever read. Unquantized checkpoints only.
    A quantized checkpoint (FP8, MXFP4) is dequantized layer by layer; its scales are checked first.
    `read_ahead`: layer 0's bytes are asked for while the rest loads, and each layer read asks for the next one
    (`io/read_ahead.py`).
    """
    from moeprune.compat import (
        ContextManagers,
        LoadStateDictConfig,
        WeightConverter,
        WeightRenaming,
        get_dtype,
        get_hf_quantizer,
        get_model_class,
        get_model_conversion_mapping,
        rename_source_key,
    )

    device = _check_device(device)
    ckpt = Checkpoint.open(path)  # refuses unknown quant_methods and scale tensors that do not fit their weights
    refuse_lazy(ckpt.config_dict)
    refuse_mixed_lazy(ckpt.config_dict, str(ckpt.path))  # transformers' expert decoder takes one width
    if tensors is not None and ckpt.quantization is not None:
        raise MoePruneError(f"{ckpt.path} is quantized: a view of its tensors (a task pack's partial load) reads "
                            "unquantized checkpoints only; export the task's model with `moeprune taskpack export`.")
    view = {e.name: e for e in ckpt.entries} if tensors is None else {t.name: t for t in tensors}
    release_freed_memory()
    bound_kernel_cache()  # before any layer computes: oneDNN reads it once
    config = copy.deepcopy(config if config is not None else ckpt.config)
    quant = ckpt.quantization
    hf_quantizer = None
    if quant is not None:
        quant.check_values(ckpt.entries)  # reads the scale tensors only
        if getattr(config, "quantization_config", None) is None:  # a given config (non-uniform) may lack it: the
            config.quantization_config = dict(quant.config)  # quantizer must know the weights are pre-quantized
        # as from_pretrained(..., quantization_config=<format>Config(dequantize=True)) builds it
        hf_quantizer, config, _ = get_hf_quantizer(config, quant.hf_dequantize_config(), None, True, {})
        fix_quantizer(quant.method, hf_quantizer)  # FP8 matrices ending in a partial block (DeepSeek-V3)
    cls = get_model_class(config, auto_class(config)._model_mapping)
    index = ckpt.path / INDEX_NAME
    sharded = json.loads(index.read_text()).get("metadata", {}) if index.is_file() else None
    files = ckpt.files
    # exactly what from_pretrained does: resolve dtype ("auto": config, then first float tensor), then build
    config, torch_dtype = get_dtype(parse_dtype(dtype), [str(f) for f in files], config, sharded, None, True,
                                    hf_quantizer)
    if is_quantized_dtype(torch_dtype):  # "auto" on a float8 checkpoint without a config dtype
        config, torch_dtype = get_dtype(torch.bfloat16, None, config, None, None, True, hf_quantizer)
    config = copy.deepcopy(config)
    with ContextManagers(cls.get_init_context(torch_dtype, hf_quantizer is not None, False, None)):
        model = cls(config)  # every tensor on meta, in the dtypes from_pretrained would give
        if hf_quantizer is not None:  # with dequantize=True: the modules stay plain (no FP8Linear / Mxfp4 experts)
            hf_quantizer.preprocess_model(model=model, dtype=torch_dtype, device_map=None,
                                          checkpoint_files=[str(f) for f in files], use_kernels=False)
    runnable(model).eval()
    if prepare is not None:
        prepare(model)
    conversions = get_model_conversion_mapping(model, None, hf_quantizer)
    load_config = LoadStateDictConfig(pretrained_model_name_or_path=str(ckpt.path), dtype=torch_dtype,
                                      dtype_plan=model._get_dtype_plan(torch_dtype), weight_mapping=conversions,
                                      hf_quantizer=hf_quantizer)

    layers = get_adapter(config).decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    head_module = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head_module), None) if head_module else None
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_sd = model.state_dict()
    keys: dict[int, list[str]] = defaultdict(list)
    by_pattern = {k: c for c in converters for k in c.source_patterns}  # as the loader finds a key's converter
    feeds: dict[str, list] = defaultdict(list)  # decoder-layer tensor -> the checkpoint entries that feed it
    sources: dict[str, list] = defaultdict(list)  # decoder-layer tensor -> (source pattern, key, entry) per feed
    copy_only: dict[str, bool] = {}
    ignored = []
    for key in view:
        # the in-memory tensor this key feeds (a converter's target for per-expert keys), as the loader decides
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        if target not in meta_sd and key in meta_sd:
            target = key
        m = layer_re.match(target)
        is_head = head_name is not None and target.startswith(head_name + ".")
        if m is not None and int(m.group(1)) < len(layers):
            keys[int(m.group(1))].append(key)
            feeds[target].append(view[key])
            sources[target].append((pattern, key, view[key]))
            copy_only[target] = copy_only.get(target, True) and copies_only(by_pattern.get(pattern))
        elif target in meta_sd and m is None and (head or not is_head):
            keys[REST].append(key)
        elif not is_head:
            ignored.append(key)  # extra layers (e.g. DeepSeek's MTP layer) or keys the model does not have
    if ignored:
        logger.info("lazy load of %s: %d checkpoint tensors match nothing in %s and are not read, e.g. %s",
                    ckpt.path, len(ignored), cls.__name__, ignored[:3])
    narrow = defaultdict(dict)
    quantized = hf_quantizer is not None
    for name, dtype in narrow_params(dict(model.named_parameters()), feeds, copy_only, quantized).items():
        narrow[int(layer_re.match(name).group(1))][name] = (dtype, meta_sd[name].dtype)
    direct: dict[int, dict[str, list[Piece]]] = defaultdict(dict)
    for target, srcs in sources.items() if hf_quantizer is None else ():
        pattern = srcs[0][0]
        if pattern in by_pattern and (pieces := plan_direct(by_pattern[pattern], srcs, tuple(meta_sd[target].shape),
                                                            load_config.dtype_plan, target)):
            direct[int(layer_re.match(target).group(1))][target] = pieces
    lazy = LazyModel(model, view, prefix, dict(keys), load_config, device, dict(narrow), dict(direct), read_ahead)
    if read_ahead and len(layers):
        lazy.advise(0)  # read while the embeddings load and the caller prepares its batches
    load_keys(lazy, keys[REST], "", skip=(prefix,) if head_name is None else (prefix, head_name))
    if head and head_name is not None and _meta_names(model.get_submodule(head_name), head_name):
        # a tied head is not in the checkpoint: tie it to the embedding, as from_pretrained does
        model.tie_weights(missing_keys=set(_meta_names(model, "")), recompute_mapping=False)
        if still := _meta_names(model.get_submodule(head_name), head_name):
            _initialise(model, still, strict=False)
    if hf_quantizer is not None:
        hf_quantizer.postprocess_model(model)  # drops quantization_config from model.config, as from_pretrained does
    logger.info("lazy model %s: %d decoder layers on meta, ~%.1f MB per layer (layer %d)", cls.__name__, len(layers),
                lazy.layer_bytes(len(layers) - 1) / 2**20, len(layers) - 1)
    return lazy


def _check_device(device: str) -> str:
    """The device name, refused before any work when malformed or not visible."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MoePruneError(f"device {device!r} is not a torch device name ({e}); use e.g. cpu or cuda:0.") from e
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MoePruneError(f"device {device!r}: no such CUDA device is visible; use cpu.")
    return str(dev)


@torch.no_grad()
def load_keys(lazy: LazyModel, keys: list[str], scope: str, skip: tuple[str, ...] = (), device: str = "cpu") -> None:
    """Load `keys` from the shards onto `device` through transformers' converters (which dequantize quantized
    weights), then give every tensor of `scope` (a module path, "" = whole model minus `skip`) still on meta its
    value: non-persistent buffers via `_init_weights`; a missing weight is an error for a decoder layer and
    random-initialised (with a warning, as `from_pretrained` does) elsewhere."""
    from transformers.utils import logging as hf_logging

    from moeprune.compat import convert_and_load_state_dict_in_model

    model = lazy.model
    state = {k: _OnDisk(lazy.entries[k]) for k in keys}  # nothing read yet
    bars, sync = hf_logging.is_progress_bar_enabled(), os.environ.get(SYNC_ENV)
    # synchronous: each fused tensor's sources are read only when it is converted (the thread pool would read
    # the whole layer up front, holding every per-expert copy while the converters stack and concatenate)
    os.environ[SYNC_ENV] = "1"
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per layer would drown the engine's bar
    try:
        load_config = dataclasses.replace(lazy.load_config, device_map={"": device})
        info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if sync is None:
            del os.environ[SYNC_ENV]
        else:
            os.environ[SYNC_ENV] = sync
    if info.conversion_errors or info.mismatched_keys:
        raise MoePruneError(f"transformers could not convert checkpoint tensors of {scope or 'the model'}: "
                            f"{info.conversion_errors or info.mismatched_keys}")
    root = model.get_submodule(scope) if scope else model
    missing = [n for n in _meta_names(root, scope) if not n.startswith(tuple(s + "." for s in skip))]
    if missing:
        _initialise(model, missing, strict=bool(scope), device=device)


class _OnDisk:
    """A checkpoint tensor that transformers' loader reads with `t[...]`, by plain file reads (no mmap, so no
    mapped file pages are counted in the process's memory)."""

    def __init__(self, entry):
        self.entry = entry  # a TensorEntry, or a view's tensor with `read()` (`load_lazy(tensors=...)`)

    def __getitem__(self, index) -> torch.Tensor:
        if index is not Ellipsis:
            raise NotImplementedError(f"only t[...] is supported, got t[{index!r}]")
        if isinstance(self.entry, TensorEntry):
            return read_tensor(self.entry)  # fresh CPU tensor, shape and dtype as stored
        return self.entry.read()

    def get_dtype(self) -> str:
        """The safetensors dtype name ("BF16", "F8_E4M3", ...), as a safetensors slice reports it."""
        return self.entry.dtype


def _meta_names(module: nn.Module, prefix: str) -> list[str]:
    dot = prefix + "." if prefix else ""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [dot + n for n, t in named if t is not None and t.is_meta]


def _initialise(model: nn.Module, names: list[str], strict: bool, device: str = "cpu") -> None:
    """Materialise `names` (full dotted names, on meta) empty on `device`, then run the owning model's
    `_init_weights` on their modules: it computes non-persistent buffers such as rotary `inv_freq`."""
    from transformers import PreTrainedModel

    from moeprune.compat import guard_torch_init_functions

    non_persistent = {n for n, _ in model.named_non_persistent_buffers()}
    weights = [n for n in names if n not in non_persistent]
    if weights and strict:
        raise MoePruneError(f"the checkpoint has no tensors for {weights[:5]}: it does not match its config.")
    if weights:
        logger.warning("the checkpoint lacks %s; they are randomly initialised, as from_pretrained does", weights)
    owners: dict[str, PreTrainedModel] = {}
    for name, module in model.named_modules():
        parent = owners.get(name.rpartition(".")[0] if "." in name else "", model)
        owners[name] = module if isinstance(module, PreTrainedModel) else parent
    modules = {}
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)
        old = getattr(module, attr)
        new = torch.empty_like(old, device=device)  # [same shape and dtype]
        if attr in module._buffers:
            module._buffers[attr] = new
        else:
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        modules[mod_name] = module
    with guard_torch_init_functions():
        for mod_name, module in modules.items():
            owners[mod_name]._init_weights(module)

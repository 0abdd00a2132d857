"""Where a model keeps its MoE blocks, found from the config alone by building the stock model on `meta`.

transformers 5 ships ~60 MoE families whose blocks sit under different names (`mlp`, `feed_forward`, `mixer`,
`block_sparse_moe`), with routers called `gate`, `router`, ..., hybrid stacks where only some layers are MoE
(attention/SSM, `first_k_dense_replace`, `mlp_only_layers`, `decoder_sparse_step`, `layer_types`), and
multimodal wrappers nesting the text decoder. Rather than one rule per family, `discover(config)` builds the stock
model class on the `meta` device (no memory, no weights) and reads the structure off it:

- decoder layers: the `ModuleList` named `*layers` (or `*blocks`: DBRX) with `num_hidden_layers` entries (of the
  text config), else with the count of the config key the model declares for its hidden-state recorder
  (LongCat-Flash: `num_layers`, as each of its decoder layers holds two attention sublayers and
  `num_hidden_layers` is 2 × `num_layers`);
- MoE block of layer i: the shallowest module under it with an `experts` child (the decoder layer itself for
  Gemma-4, whose router and experts sit next to its dense MLP; `block_name` is then ""); MoE layers are those
  that have one;
- router: the block's child (not experts, not shared) owning a parameter with E rows, E = the experts' count
  (fused: dim 0 of every parameter, or of `down_proj` when the input projection also holds rows for weightless
  extra router classes; ModuleList: its length), or with E + Z rows: Z extra router classes (LongCat-Flash's
  identity "zero experts", `router_rows` = E + Z, the last Z classes, always kept);
- shared experts: the block's children whose name contains "shared";
- the checkpoint name of every in-memory tensor, through transformers' own conversion mapping
  (`rename_source_key`), so a checkpoint key can be classified by what it feeds (`target_of`).

Results are cached per config (its JSON), so adapters can ask repeatedly.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moeprune.errors import MoePruneError

EXPERTS_NAME = "experts"
LAYERS_NAMES = ("layers", "blocks")  # how the ModuleList of decoder layers ends (DBRX: transformer.blocks)


@dataclass(frozen=True)
class Structure:
    layers_path: str  # e.g. "model.layers" or "model.language_model.layers"
    moe_layers: tuple[int, ...]
    block_name: str  # module path under a decoder layer, e.g. "mlp", "feed_forward", "mixer"
    router_name: str  # child of the block
    experts_name: str
    shared_names: tuple[str, ...]
    num_experts: int
    width: int | None  # expert width I read from the experts' tensors (None when not readable)
    router_class: str
    experts_class: str
    meta: Any = field(repr=False, compare=False, default=None)  # the meta model (for names and conversions)
    num_layers: int = 0  # entries of the decoder-layer ModuleList
    router_rows: int = 0  # classes the router scores: E, or E + Z with Z weightless extra classes at the end

    @property
    def extra_classes(self) -> int:
        """Z: router classes after the E experts that have no expert weights (identity "zero experts")."""
        return max(0, self.router_rows - self.num_experts)


def build_meta(config: Any) -> nn.Module:
    """The stock model of `config` on the meta device (nothing allocated)."""
    from moeprune.io.stock import auto_class

    config = copy.deepcopy(config)
    with torch.device("meta"):
        return auto_class(config).from_config(config, dtype=torch.float32)


def _text(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder_layers(model: nn.Module, n: int) -> tuple[str, nn.ModuleList]:
    found = [(name, m) for name, m in model.named_modules()
             if name.endswith(LAYERS_NAMES) and isinstance(m, nn.ModuleList) and len(m) == n]
    with_experts = [(name, m) for name, m in found if any(s.endswith("." + EXPERTS_NAME) or s == EXPERTS_NAME
                                                          for s, _ in m.named_modules())]
    if not (with_experts or found):
        raise MoePruneError(f"{type(model).__name__} has no ModuleList '*layers' or '*blocks' of {n} decoder layers.")
    return (with_experts or found)[0]


def layer_counts(model: nn.Module, text: Any) -> tuple[int, ...]:
    """Candidate entries of the decoder-layer ModuleList: `num_hidden_layers`, then the value of the config key the
    model's hidden-state recorder declares (`_can_record_outputs["hidden_states"].num_hidden_layers_key`)."""
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("hidden_states")
    key = getattr(recorder, "num_hidden_layers_key", None)
    value = getattr(text, key, None) if key else None
    return tuple(dict.fromkeys((int(text.num_hidden_layers), *([value] if isinstance(value, int) else []))))


def _expert_rows(experts: nn.Module) -> tuple[int, int] | None:
    """(E, router rows) of an experts container: E + Z rows for Z weightless extra router classes (LongCat-Flash),
    E otherwise; None when not readable."""
    from moeprune.models.layouts import FlatLayout, fused_rows

    if isinstance(experts, nn.ModuleList):
        return len(experts), len(experts)
    if FlatLayout.matches(experts):
        E = FlatLayout.num_experts(experts)
        return E, E
    return fused_rows(experts)


def _width(experts: nn.Module) -> int | None:
    from moeprune.models.fused_styles import style_of
    from moeprune.models.layouts import FlatLayout

    if FlatLayout.matches(experts):
        return FlatLayout.width(experts)
    if isinstance(experts, nn.ModuleList):
        first = experts[0]
        lin = next((getattr(first, n) for n in ("gate_proj", "w1", "up_proj", "w3") if hasattr(first, n)), None)
        return int(lin.weight.shape[0]) if lin is not None else None
    if getattr(experts, "down_proj", None) is None or getattr(experts.down_proj, "dim", lambda: 0)() != 3:
        return None
    return style_of(experts).width(experts)


def _router(block: nn.Module, skip: set[str], fits: Callable[[int], bool],
            only: tuple[str, ...] = ()) -> tuple[str, int] | None:
    """(name, rows) of the first block child not in `skip` ("gate" / "router" first; only the children named in
    `only` when given) owning a 2-D parameter whose row count satisfies `fits(rows)`, else None."""
    names = sorted((n for n, _ in block.named_children() if n not in skip and (not only or n in only)),
                   key=lambda n: (n not in ("gate", "router"), n))
    for name in names:
        found = [p.shape[0] for p in getattr(block, name).parameters() if p.dim() == 2 and fits(p.shape[0])]
        if found:
            return name, int(found[0])
    return None


def _scan(model: nn.Module, config: Any) -> Structure:
    text = _text(config)
    counts = layer_counts(model, text)
    for n in counts:
        try:
            path, layers = _decoder_layers(model, n)
            break
        except MoePruneError:
            if n == counts[-1]:
                raise
    found: dict[int, tuple[str, nn.Module]] = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():  # "" first: the decoder layer itself may be the block (gemma4)
            if isinstance(getattr(module, EXPERTS_NAME, None), nn.Module):
                found[i] = (name, module)
                break
    if not found:
        raise MoePruneError(f"{type(model).__name__}: no decoder layer has a module with an '{EXPERTS_NAME}' child.")
    names = {name for name, _ in found.values()}
    if len(names) != 1:
        raise MoePruneError(f"{type(model).__name__}: MoE blocks sit under different names {sorted(names)}.")
    block_name = names.pop()
    block = next(iter(found.values()))[1]
    experts = getattr(block, EXPERTS_NAME)
    counts = _expert_rows(experts)
    if not counts or not counts[0]:
        raise MoePruneError(f"{type(experts).__name__}: cannot read the number of experts from its tensors.")
    E, rows = counts
    shared = tuple(n for n, _ in block.named_children() if "shared" in n)
    skip = {EXPERTS_NAME, *shared}
    owner = _router(block, skip, lambda r: r in (E, rows))
    if owner is None:  # a block that handles weightless extra classes itself (LongCat-Flash, transformers 5.25):
        # experts of E rows, a router child ("gate" / "router") of E + Z rows
        owner = _router(block, skip, lambda r: r > E, only=("gate", "router"))
        rows = owner[1] if owner else rows
    router = owner[0] if owner else None
    if router is None:
        raise MoePruneError(f"{type(block).__name__}: no child of the MoE block has a weight with {E} rows "
                            "(no router found).")
    if rows != E and not any(p.dim() == 2 and p.shape[0] == rows for p in getattr(block, router).parameters()):
        rows = E  # the router scores the experts only: the extra rows are something else
    return Structure(path, tuple(sorted(found)), block_name, router, EXPERTS_NAME, shared, E, _width(experts),
                     type(getattr(block, router)).__name__, type(experts).__name__, model, len(layers), rows)


_META: dict[str, tuple[Any, nn.Module, Structure | None]] = {}  # config JSON -> (config, meta model, structure)
_CACHE_SIZE = 32


def _entry(config: Any) -> tuple[str, tuple[Any, nn.Module, Structure | None]]:
    """The cache entry of `config` (built on first use; the oldest entry goes when the cache is full)."""
    key = config.to_json_string(use_diff=False)
    if key not in _META:
        try:
            model = build_meta(config)
        except MoePruneError:
            raise
        except Exception as e:  # the stock class cannot be built from this config
            raise MoePruneError(f"cannot build {type(config).__name__} on meta to find its MoE blocks: "
                                f"{type(e).__name__}: {e}") from e
        if len(_META) >= _CACHE_SIZE:
            del _META[next(iter(_META))]
        _META[key] = (copy.deepcopy(config), model, None)
    return key, _META[key]


def meta_model(config: Any) -> nn.Module:
    """The stock model of `config` on meta, cached per config JSON. Raises MoePruneError when it cannot be built."""
    return _entry(config)[1][1]


_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _floats(obj: Any) -> Any:
    """Undo the config JSON's tagging of non-finite floats ({"__float__": "Infinity"}: nemotron_h's
    time_step_limit), which `from_dict` does not decode."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _FLOATS:
            return _FLOATS[obj["__float__"]]
        return {k: _floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_floats(v) for v in obj]
    return obj


def config_from_json(config_json: str, config_class: type) -> Any:
    """The config a `to_json_string()` describes (the cache keys of this module and `models/coupling.py`)."""
    import json

    return config_class.from_dict(_floats(json.loads(config_json)))


def discover(config: Any) -> Structure:
    """The MoE structure of `config`'s stock model (see the module docstring). Raises MoePruneError."""
    key, (cfg, model, structure) = _entry(config)
    if structure is None:
        structure = _scan(model, cfg)
        _META[key] = (cfg, model, structure)
    return structure


def target_of(structure: Structure, key: str) -> str:
    """The in-memory tensor name a checkpoint key feeds, as transformers' loader decides (renamings and
    converters of the model's conversion mapping); the key itself when nothing renames it."""
    targets = _targets(id(structure.meta), structure)
    return targets(key)


@functools.lru_cache(maxsize=32)
def _targets(_: int, structure: Structure):
    from moeprune.compat import WeightConverter, WeightRenaming, get_model_conversion_mapping, rename_source_key

    model = structure.meta
    conversions = get_model_conversion_mapping(model, None, None)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_sd = {k: None for k in model.state_dict()}

    @functools.cache
    def one(key: str) -> str:
        target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        return key if target not in meta_sd and key in meta_sd else target

    return one


PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<j>\d+)(?P<suffix>\..+)$")

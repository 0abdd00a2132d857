"""Which config keys size other tensors from the routed-expert width, found on the meta model.

Many families size their shared experts from the routed width I: DeepSeek `moe_intermediate_size ×
n_shared_experts`, afmoe / exaone_moe / hy_v3 `× num_shared_experts`, ernie4_5_moe `× moe_num_shared_experts`,
aria `intermediate_size × moe_num_shared_experts`. When neuron surgery writes the new width I' into the config,
a stock model built from it would size those tensors S' = I' × n ≠ S and reload fails ("ignore_mismatched_sizes").
Rather than a list of aliases, `width_companions` builds the stock model on the `meta` device (no memory):

    changed(width)   = the non-routed tensors whose shape changes when only the width key changes;
    changed(key)     = those that change when only an int config key (name containing "shared") changes;

a key with changed(key) == changed(width) is the width's *companion*: its value n must become n' = I·n / I' so
that I' × n' = S. `companion_updates` returns those new values, refuses (with the widths that would work) when
I·n / I' is not an integer, raises `UnsupportedLayout` when no key compensates (llama4: the shared expert and
the routed experts share `intermediate_size`), and checks the final config on meta: every tensor
outside the routed experts keeps its shape.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from moeprune.errors import MoePruneError, UnsupportedLayout
from moeprune.models.keys import get_key, set_key


def _text(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _with(config: Any, **values: int) -> Any:
    """A deep copy of `config` with `values` set on its text sub-config."""
    out = copy.deepcopy(config)
    for k, v in values.items():
        set_key(_text(out), k, v)  # dotted: inside a sub-config (models/keys.py)
    return out


def _shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the stock model of `config` (the meta model `models/structure.py` caches)."""
    from moeprune.models.structure import meta_model

    return {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}


def _changed(base: dict, other: dict, routed: re.Pattern[str]) -> frozenset[str]:
    """Names (outside the routed experts) whose shape differs, or that exist on one side only."""
    names = set(base) | set(other)
    return frozenset(n for n in names if not routed.search(n) and base.get(n) != other.get(n))


def _candidates(config: Any, width_key: str) -> list[str]:
    text = _text(config)
    keys = sorted(set(text.to_dict()) | {k for k in dir(type(text)) if not k.startswith("_")})
    return [k for k in keys if "shared" in k and k != width_key and isinstance(getattr(text, k, None), int)
            and not isinstance(getattr(text, k), bool) and getattr(text, k) >= 1]


def routed_pattern(block_name: str, experts_name: str) -> re.Pattern[str]:
    """Matches the state-dict names of the routed experts (what neuron surgery reshapes on purpose)."""
    block = re.escape(block_name) + r"\." if block_name else ""  # "": the decoder layer is the block (Gemma-4)
    return re.compile(rf"\.(?:layers|blocks)\.\d+\.{block}{re.escape(experts_name)}\.")


def companion_keys(config: Any, width_key: str, routed: re.Pattern[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """(tensors outside the routed experts that the width key sizes, the config keys that size exactly those)."""
    old = get_key(_text(config), width_key)
    base = _shapes(config)
    coupled = _changed(base, _shapes(_with(config, **{width_key: old + 1})), routed)
    if not coupled:
        return coupled, ()
    return coupled, tuple(k for k in _candidates(config, width_key) if _sizes(config, k, base, routed) == coupled)


def _sizes(config: Any, key: str, base: dict, routed: re.Pattern[str]) -> frozenset[str] | None:
    """The non-routed tensors that `key` + 1 reshapes (None: the model cannot be built with that value)."""
    try:
        return _changed(base, _shapes(_with(config, **{key: getattr(_text(config), key) + 1})), routed)
    except Exception:  # noqa: BLE001  (a config validator refusing the value: not a companion)
        return None


def companion_updates(config: Any, width_key: str, new: int, routed: re.Pattern[str], align: int = 1
                      ) -> dict[str, int]:
    """The config values (text sub-config) that keep every non-routed tensor's shape when `width_key` becomes
    `new`: {} when nothing else depends on the width, else {companion key: I·n / I'} (module docstring).
    Raises MoePruneError when no integer value works, naming the kept widths that would."""
    text = _text(config)
    old = int(get_key(text, width_key))
    if new == old:
        return {}
    coupled, keys = companion_keys(config, width_key, routed)
    if not coupled:
        return {}
    where = ", ".join(sorted(coupled)[:3]) + (" ..." if len(coupled) > 3 else "")
    if not keys:
        raise UnsupportedLayout(
            f"{type(text).__name__}.{width_key} sizes the routed experts and also {where}; no config key containing "
            "'shared' sizes the same tensors, so a stock config cannot describe the pruned width. Expert-width "
            "(neuron) pruning is not possible for this family.")
    key = keys[0]
    n = int(getattr(text, key))
    total = old * n
    if total % new:
        ok = [d for d in range(1, old + 1) if total % d == 0 and d % align == 0]
        near = sorted(ok, key=lambda d: abs(d - new))[:4]
        raise MoePruneError(
            f"{type(text).__name__} sizes {where} as {width_key} × {key} = {old} × {n} = {total}; a kept width of "
            f"{new} does not divide {total}, so a stock config cannot describe them any more. Keep a width that "
            f"divides {total}{f' and is a multiple of {align}' if align > 1 else ''} (nearest: {sorted(near)}).")
    updates = {key: total // new}
    after = _changed(_shapes(config), _shapes(_with(config, **{width_key: new}, **updates)), routed)
    if after:
        raise MoePruneError(f"{width_key}={new} with {key}={updates[key]} still changes {sorted(after)[:3]}; "
                            "expert-width pruning cannot keep this family's other tensors.")
    return updates

"""The config.json of a checkpoint with per-layer expert widths: the sentinel that marks it and what it records.

Config-only (no weights, no model): `Checkpoint.config` and `load_model` ask `is_nonuniform` before they pick a
loader. The format and the loader are described in `io/nonuniform.py`, which re-exports every name here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeprune.errors import MoePruneError

KEY = "moeprune_nonuniform"
SENTINEL = "moeprune_nonuniform__load_with_moeprune.load_model"


def is_nonuniform(config_dict: dict) -> bool:
    return isinstance(config_dict.get(KEY), dict)


def restored_config(config_dict: dict) -> Any:
    """The transformers config object of a non-uniform folder (its real model_type restored)."""
    from transformers import AutoConfig

    info = config_dict[KEY]
    d = {k: v for k, v in config_dict.items() if k not in (KEY, "model_type")}
    try:
        return AutoConfig.for_model(info["model_type"], **d)
    except (ValueError, KeyError) as e:
        raise MoePruneError(f"cannot rebuild the {info.get('model_type')!r} config of a non-uniform moeprune "
                            f"checkpoint: {e}") from e


def widths(config_dict: dict) -> dict[int, int]:
    return {int(k): int(v) for k, v in config_dict[KEY]["widths"].items()}


def mark(folder: Path, model_type: str, layer_widths: dict[int, int], kept: dict[int, dict[int, int]]) -> None:
    """Rewrite FOLDER/config.json of a freshly saved non-uniform model (see `io/nonuniform.py`)."""
    f = folder / "config.json"
    d = json.loads(f.read_text())
    d["model_type"] = SENTINEL
    d[KEY] = {"model_type": model_type, "widths": {str(k): v for k, v in sorted(layer_widths.items())},
              "kept": {str(k): {str(j): n for j, n in sorted(v.items())} for k, v in sorted(kept.items())}}
    f.write_text(json.dumps(d, indent=2) + "\n")

"""Resumable distillation state, written atomically: a killed run resumes and ends where an uninterrupted one does.

    CHECKPOINT_DIR/distill_state.pt   {"format", "fingerprint", "step", "trainable": {name: tensor},
                                       "optimizer", "scheduler", "rng", "cuda_rng", "progress": {...}}
written to a temporary file, flushed to disk, then renamed over the old one (a kill leaves the old state or the new,
never half of one). The fingerprint (options that change the result, trainable names and shapes, the training
windows, the model and the plans before) must match to resume; otherwise the run refuses and says what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moeprune.errors import MoePruneError

FORMAT = "moeprune.distill-state/1"
STATE_NAME = "distill_state.pt"


def normalise(fingerprint: dict) -> dict:
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def save_state(folder: str | Path, state: dict[str, Any]) -> Path:
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / STATE_NAME, folder / f".{STATE_NAME}.tmp"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def load_state(folder: str | Path, fingerprint: dict) -> dict[str, Any] | None:
    """The saved state when `folder` holds one made by the same run (same fingerprint); None when it holds none."""
    path = Path(folder).expanduser() / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file gets the same advice
        raise MoePruneError(f"{path} cannot be read ({e}); delete it to start the distillation over.") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MoePruneError(f"{path} is not a moeprune distillation state ({FORMAT}); delete it or choose another "
                            "checkpoint_dir.")
    saved, now = state.get("fingerprint") or {}, normalise(fingerprint)
    if saved != now:
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise MoePruneError(f"{path} was written by another distillation (different {', '.join(differ)}); delete it "
                            "or choose another checkpoint_dir to start over.")
    return state

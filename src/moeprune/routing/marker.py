"""The marker tensor of a dynamic routing export: what makes a plain `from_pretrained` say the policy is not applied.

A dynamic policy (top_p, naee_skip, otp) lives in config.json's `moeprune_routing` block, which stock transformers
keeps as a config attribute and never reads, so a plain `from_pretrained` would route with the model's own top-k
without a word. The export therefore also holds one tensor the stock class does not have,

    moeprune_routing.<method>.not_applied_by_from_pretrained    uint8 [n]: the plan's JSON

in its own shard (`moeprune_routing.safetensors`, named by `model.safetensors.index.json`; a one-file export is
renamed to `model-00001-of-00001.safetensors` so that transformers reads the index). Stock transformers lists it
as UNEXPECTED in its LOAD REPORT (a warning, printed at the default verbosity), naming the block; the weights load
unchanged. `moeprune.load_model` ignores the key and applies the policy; moeprune's own checkpoint reader
(`io/checkpoint.Checkpoint`) skips it, so sizes, verification and later stages see the model's weights only.
llama.cpp and vLLM route one top-k per layer: `export gguf` refuses such an export (docs/routing.md).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import INDEX_NAME, ROUTING_MARKER_PREFIX
from moeprune.io.safetensors_io import read_header

MARKER_FILE = "moeprune_routing.safetensors"
ONE_FILE = "model.safetensors"
RENAMED = "model-00001-of-00001.safetensors"


def marker_key(method: str) -> str:
    return f"{ROUTING_MARKER_PREFIX}{method}.not_applied_by_from_pretrained"


def write_marker(folder: str | Path, plan) -> str:
    """Add the marker shard to an export folder (in its temporary directory, before the rename). Returns the key."""
    from safetensors.torch import save_file

    folder = Path(folder)
    index_file = folder / INDEX_NAME
    if index_file.is_file():
        index = json.loads(index_file.read_text())
    elif (folder / ONE_FILE).is_file():
        (folder / ONE_FILE).rename(folder / RENAMED)  # transformers reads model.safetensors before any index
        entries = read_header(folder / RENAMED)[0]
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: RENAMED for e in entries}}
    else:
        raise MoePruneError(f"{folder} has neither {ONE_FILE} nor {INDEX_NAME}; cannot add the routing marker.")
    key = marker_key(plan.method)
    data = json.dumps(plan.to_dict(), sort_keys=True).encode()
    save_file({key: torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()}, str(folder / MARKER_FILE),
              metadata={"format": "pt"})
    index["weight_map"] = dict(sorted({**index["weight_map"], key: MARKER_FILE}.items()))
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    return key


@contextmanager
def marker_ignored(auto_class, config):
    """While loading with `auto_class.from_pretrained`, the resolved model class ignores the marker key (its
    `_keys_to_ignore_on_load_unexpected`, which transformers' post_init copies into the instance)."""
    from moeprune import compat

    try:
        cls = compat.get_model_class(config, auto_class._model_mapping)
    except (KeyError, ValueError, AttributeError):  # remote code: its class is not in the mapping
        yield
        return
    own = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    had = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    cls._keys_to_ignore_on_load_unexpected = [*(cls._keys_to_ignore_on_load_unexpected or []),
                                              "^" + ROUTING_MARKER_PREFIX.replace(".", r"\.")]
    try:
        yield
    finally:
        if had:
            cls._keys_to_ignore_on_load_unexpected = own
        else:
            del cls._keys_to_ignore_on_load_unexpected

"""A Hugging Face checkpoint directory on disk, inspected without loading any weights.

`Checkpoint.open(path)` validates what every command needs before expensive work: the folder exists, has a
config.json and safetensors weights whose headers parse and whose files are not truncated, and the index (when
sharded) names only files that exist, and, for a quantized checkpoint, that its format is supported and its scale
tensors fit their weights (headers only: `io.quant`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.io.nonuniform_config import is_nonuniform, restored_config
from moeprune.io.quant import QuantFormat, quant_format
from moeprune.io.remote import check_remote, trusted
from moeprune.io.safetensors_io import TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
# the calibration statistics an export carries along (pipeline/export.py): a safetensors file, not weights
STATS_NAME = "moeprune_stats.safetensors"
# the marker tensor of a dynamic routing export (`routing/marker.py`): not a weight, skipped by `Checkpoint`
ROUTING_MARKER_PREFIX = "moeprune_routing."
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
# measurements of the source model, wrong for a smaller copy: the testbed's routing heat map (its testbed.json is
# copied: it marks the copy as made from the testbed and points at its data, see testbed.build.find_testbed)
SOURCE_MEASUREMENTS = {"routing.png"}
# what an export of this folder writes itself: a parent export's plans must not pass for the child's
MOEPRUNE_OUTPUTS = {"moeprune_report.json", "moeprune_recipe.json", "moeprune_merge.json", "moeprune_neurons.json"}
NOT_COPIED = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json", *MOEPRUNE_OUTPUTS, *SOURCE_MEASUREMENTS}


@dataclass
class Checkpoint:
    path: Path
    config_dict: dict
    entries: list[TensorEntry] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path).expanduser()
        if not path.exists():
            raise MoePruneError(
                f"{path} does not exist. moeprune works on local checkpoint folders (no hub downloads): "
                "pass the folder that holds config.json and *.safetensors."
            )
        if not path.is_dir():
            raise MoePruneError(f"{path} is a file; pass the checkpoint folder that holds config.json.")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise MoePruneError(f"{path} has no config.json: it is not a Hugging Face checkpoint folder.")
        try:
            config_dict = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise MoePruneError(f"{cfg_file} is not valid JSON ({e}).") from e
        check_remote(config_dict, path)  # remote code runs only after --trust-remote-code
        files = _weight_files(path)
        entries: list[TensorEntry] = []
        for f in files:
            entries.extend(e for e in read_header(f)[0] if not e.name.startswith(ROUTING_MARKER_PREFIX))
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise MoePruneError(f"{path}: the same tensor name appears in several shards; the checkpoint is broken.")
        quant = quant_format(config_dict, str(cfg_file))  # unknown quant_method: refused here
        if quant is not None:
            quant.check_headers(entries)
        return cls(path.resolve(), config_dict, entries)

    @property
    def quantization(self) -> QuantFormat | None:
        """The quantized format (FP8 blocks, MXFP4) of the weights, None when unquantized."""
        return quant_format(self.config_dict)

    @cached_property
    def config(self) -> Any:
        """The transformers config object (no weights, no network)."""
        from transformers import AutoConfig

        if is_nonuniform(self.config_dict):  # per-layer expert widths: the real config, restored
            return restored_config(self.config_dict)
        try:
            return AutoConfig.from_pretrained(str(self.path), local_files_only=True, trust_remote_code=trusted())
        except (ValueError, KeyError, OSError) as e:
            raise MoePruneError(f"transformers cannot read {self.path / 'config.json'}: {e}.") from e

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries})

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def torch_dtypes(self) -> dict:
        """Tensor name -> torch dtype as stored on disk."""
        from moeprune.io.safetensors_io import DTYPES

        return {e.name: DTYPES[e.dtype][1] for e in self.entries}

    def copy_side_files(self, dst: Path) -> list[str]:
        """Copy tokenizer, generation config, chat template, custom code ... (everything but weights/config)."""
        copied = []
        for f in sorted(self.path.iterdir()):
            if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(WEIGHT_SUFFIXES):
                if not (dst / f.name).exists():
                    shutil.copy2(f, dst / f.name)
                    copied.append(f.name)
        return copied


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise MoePruneError(f"{index} is not a valid safetensors index ({e}).") from e
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MoePruneError(f"{index} names shards that are missing: {', '.join(missing)}.")
        return files
    files = sorted(f for f in path.glob("*.safetensors") if f.name != STATS_NAME)
    if not files:
        hint = " (only PyTorch .bin files: re-save them with save_pretrained(...))" if any(path.glob("*.bin")) else ""
        raise MoePruneError(f"{path} has no *.safetensors weights{hint}.")
    return files

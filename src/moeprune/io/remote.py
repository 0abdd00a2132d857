"""Remote-code checkpoints (Kimi-K2 style, older DeepSeek, ...): their config.json names Python classes
(`auto_map`) that live as .py files in the checkpoint folder. Loading them executes that code, so moeprune does it
only after an explicit opt-in: `--trust-remote-code` on the command line, `trust_remote_code()` in Python.

Without the opt-in such a folder is refused when it is opened (`Checkpoint.open`), before any work, with a message
that names the flag and the risk. With it, configs and models are loaded with transformers'
`trust_remote_code=True`, from local files only; the structural fallback adapter (`models/generic.py`) handles
their ModuleList-of-MLP experts. Layer-by-layer loading (`--lazy`) goes through transformers' own loader
internals, which do not build remote classes: remote-code models are loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moeprune.errors import MoePruneError

_TRUST = {"on": False}
FLAG = "--trust-remote-code"


def trusted() -> bool:
    return _TRUST["on"]


@contextmanager
def trust_remote_code(on: bool = True) -> Iterator[None]:
    """Inside the context, checkpoints with remote code are loaded (their .py files are executed)."""
    before = _TRUST["on"]
    _TRUST["on"] = bool(on)
    try:
        yield
    finally:
        _TRUST["on"] = before


def is_remote(config_dict: dict) -> bool:
    """Whether config.json asks for classes from the checkpoint folder (auto_map), at top level or nested."""
    return bool(config_dict.get("auto_map")) or any(
        isinstance(v, dict) and bool(v.get("auto_map")) for v in config_dict.values())


def check_remote(config_dict: dict, path: Path) -> None:
    """Refuse a remote-code checkpoint unless the opt-in is on."""
    if is_remote(config_dict) and not trusted():
        classes = sorted(set((config_dict.get("auto_map") or {}).values()))
        raise MoePruneError(
            f"{path} is a remote-code checkpoint: its config.json maps to Python code in the folder "
            f"({', '.join(classes) or 'auto_map'}). Loading it runs that code with your permissions. If you trust "
            f"the checkpoint's source, pass {FLAG} (Python: `with moeprune.io.remote.trust_remote_code(): ...`).")


def refuse_lazy(config_dict: dict) -> None:
    """Layer-by-layer loading cannot build remote classes."""
    if is_remote(config_dict):
        raise MoePruneError("layer-by-layer loading (--lazy) does not support remote-code models: transformers' "
                            "loader internals it reuses build stock classes only. Run without --lazy (the model is "
                            "loaded whole).")

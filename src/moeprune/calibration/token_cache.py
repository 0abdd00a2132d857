"""Token-id cache: a calibration source's text pieces are tokenised once per tokenizer and options.

A cache file holds the token ids of the pieces of one source that were tokenised so far (`p<i>` -> int64 [n]),
keyed by sha256 over (the source's content sha256, the tokenizer's fingerprint, the piece rule and the reading
options). Folder: `$MOEPRUNE_TOKEN_CACHE`, else `$XDG_CACHE_HOME/moeprune/tokens`, else `~/.cache/moeprune/tokens`;
`MOEPRUNE_TOKEN_CACHE=off` turns the cache off. Files are written atomically (a temporary file in the same folder,
then `os.replace`): a reader never sees half a file, concurrent writers of one key leave one whole file. A file that
cannot be read is ignored (and replaced on the next write). The fingerprint of a fast tokenizer is the sha256 of its
serialised `tokenizer.json` plus its class and special tokens; a tokenizer without one is not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from moeprune.log import logger

ENV = "MOEPRUNE_TOKEN_CACHE"
OFF = frozenset({"off", "0", "none", "false"})


def cache_dir() -> Path | None:
    """The cache folder, or None when `MOEPRUNE_TOKEN_CACHE=off`."""
    env = os.environ.get(ENV)
    if env is not None and env.strip().lower() in OFF:
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moeprune" / "tokens"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of what decides the ids: the serialised fast tokenizer, its class and special tokens (None: unknown)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        body = backend.to_str() if backend is not None else None
    except Exception:  # noqa: BLE001 - any failure only means "do not cache"
        body = None
    if body is None:
        return None
    h = hashlib.sha256(body.encode())
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    h.update(json.dumps([type(tokenizer).__name__, getattr(tokenizer, "eos_token_id", None),
                         {k: str(v) for k, v in sorted(special.items())}]).encode())
    return h.hexdigest()


class TokenCache:
    """Token ids of one source's pieces; `get`/`put` by piece index, `save()` writes new pieces (atomically)."""

    def __init__(self, key: str | None):
        folder = cache_dir() if key is not None else None
        self.path = folder / f"{key}.safetensors" if folder is not None else None
        self.pieces: dict[int, torch.Tensor] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                from safetensors.torch import load_file

                self.pieces = {int(k[1:]): v for k, v in load_file(self.path).items()}
            except Exception as e:  # noqa: BLE001 - a broken cache file is rebuilt, never trusted
                logger.warning("token cache %s unreadable (%s); tokenising again", self.path, e)
                self.pieces = {}

    @staticmethod
    def key(content_sha256: str, tokenizer: Any, options: dict) -> str | None:
        fp = tokenizer_fingerprint(tokenizer)
        if fp is None:
            return None
        return hashlib.sha256(json.dumps([content_sha256, fp, options], sort_keys=True).encode()).hexdigest()

    def get(self, i: int) -> list[int] | None:
        ids = self.pieces.get(i)
        return ids.tolist() if ids is not None else None

    def put(self, i: int, ids: list[int]) -> None:
        self.pieces[i] = torch.tensor(ids, dtype=torch.long)
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        from safetensors.torch import save_file

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.path.parent)
            os.close(fd)
            try:
                save_file({f"p{i}": t for i, t in sorted(self.pieces.items())}, tmp)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:  # a read-only or full disk costs speed, not correctness
            logger.warning("token cache not written to %s (%s); set %s to a writable folder or 'off'",
                           self.path, e, ENV)
        self.dirty = False

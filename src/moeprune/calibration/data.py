"""Calibration data: named local text sources -> seeded token batches, validated before any model is loaded.

`--calib NAME=PATH` (repeatable, one NAME per domain/task), PATH being
- a `.txt` file (one document),
- a folder (every `*.txt` and `*.txt.gz` below it, sorted; one document each),
- a `.jsonl` file, one JSON object per line with a text field (`text_field`, default "text"), or a `messages`
  list rendered with the tokenizer's chat template when `chat_template=True`.
A name ending in `.gz` (`.txt.gz`, `.jsonl.gz`) is decompressed with gzip first. Text must be UTF-8: a file with
NUL bytes or invalid UTF-8 (binary data, a compressed file without `.gz`) is refused with its name, never decoded
with replacement characters.

Sampling (per source, seeded). Small sources (at most SAMPLE_ABOVE = 16 characters of text per token the scored
windows need, N·L): each document is tokenised and followed by EOS (when the tokenizer has one); the
documents are concatenated into one stream of S tokens in their order. Large sources are not tokenised whole: the
documents are cut into pieces of about 8·L characters (after a newline where there is one, `split_pieces`), the
pieces are put in a seeded random order and tokenised one after another (EOS after a document's last piece) until
the stream holds N·L tokens: its N consecutive windows are the sample; tokenising goes on in the same order for the
`held_out` windows kept apart (never scored), so `held_out` never changes the scored windows. Pieces are contiguous
text, so windows are runs of real text (a window may span two pieces, as it may span two documents). If all pieces
together give fewer than N·L tokens, the source is used as a small one. A small source's stream is cut into ⌊S / L⌋
disjoint windows of L tokens, and N of them are drawn without replacement (`torch.randperm` under the seed); the
next `held_out` windows of the same permutation are kept apart. With fewer than N full windows, all are used and the
remaining tail (if any) becomes one last sequence right-padded to L with `attention_mask = 0`; every statistic must
ignore those positions. Token ids are cached per piece by content and tokenizer
(`token_cache.py`). The content hash covers the (decompressed) source bytes and the sampling parameters.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeprune.calibration.token_cache import TokenCache
from moeprune.errors import MoePruneError
from moeprune.log import logger


@dataclass(frozen=True)
class CalibSource:
    name: str
    path: Path
    flag: str = "--calib"  # the option it came from, for error messages (`moeprune eval` uses --data)

    @classmethod
    def parse(cls, spec: str, flag: str = "--calib") -> CalibSource:
        """'NAME=PATH' -> CalibSource; errors say what the flag must look like."""
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise MoePruneError(f"{flag} {spec!r}: write it as NAME=PATH, e.g. {flag} code=data/code.jsonl")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name.strip()):
            raise MoePruneError(f"{flag} {spec!r}: the name {name.strip()!r} may only use letters, digits, '_', "
                                "'.' and '-' (it names the set in statistics files).")
        p = Path(path.strip()).expanduser()
        if not p.exists():
            raise MoePruneError(f"{flag} {name}: {p} does not exist.")
        return cls(name.strip(), p, flag)


@dataclass(frozen=True)
class CalibConfig:
    sources: tuple[CalibSource, ...]
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str = "text"
    chat_template: bool = False
    warn_short: bool = True  # evaluation takes "all windows up to `samples`" and does not warn
    held_out: int = 0  # full windows kept apart from the sampled ones (never scored) for a quality check

    def __post_init__(self) -> None:
        if not self.sources:
            raise MoePruneError("no calibration data: pass at least one --calib NAME=PATH.")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MoePruneError(f"{self.sources[0].flag} names must be unique; {dup} given more than once.")
        if self.samples < 1:
            raise MoePruneError(f"--samples must be >= 1, got {self.samples}.")
        if self.seq_len < 2:
            raise MoePruneError(f"--seq-len must be >= 2, got {self.seq_len}.")


@dataclass
class CalibSet:
    """One named calibration set: input_ids / attention_mask [N, L] and where they came from."""

    name: str
    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] long, 0 on padding
    sha256: str
    source: str
    documents: int
    stream_tokens: int  # tokens of the stream the windows were cut from (sampled sources: tokens tokenised)
    meta: dict[str, Any] = field(default_factory=dict)  # "sampled": windows from random text pieces
    held_out_ids: torch.Tensor | None = None  # [M, L] full windows the sampling did not draw (quality check)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "sequences": int(self.input_ids.shape[0]),
                "seq_len": int(self.input_ids.shape[1]), "tokens": self.tokens, "documents": self.documents,
                "stream_tokens": self.stream_tokens, "sampled": bool(self.meta.get("sampled", False))}


def read_documents(source: CalibSource, text_field: str = "text", chat_template: bool = False,
                   tokenizer: Any = None) -> tuple[list[str], bytes]:
    """The source's documents and the raw bytes they came from (for the content hash)."""
    path = source.path
    if path.is_dir():
        files = sorted([*path.rglob("*.txt"), *path.rglob("*.txt.gz")])
        if not files:
            raise MoePruneError(f"{source.flag} {source.name}: folder {path} holds no *.txt (or *.txt.gz) files.")
        raws = [read_bytes(source, f) for f in files]
        docs = [decode_text(source, f, r) for f, r in zip(files, raws, strict=True)]
        raw = b"\0".join(raws)
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        raw = read_bytes(source, path)
        docs = _jsonl_documents(source, decode_text(source, path, raw), text_field, chat_template, tokenizer)
    else:
        raw = read_bytes(source, path)
        docs = [decode_text(source, path, raw)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MoePruneError(f"{source.flag} {source.name}: {path} holds no text.")
    return docs, raw


def read_bytes(source: CalibSource, path: Path) -> bytes:
    """The bytes of `path`, gunzipped when its name ends in `.gz`."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated file raises EOFError
            raise MoePruneError(f"{source.flag} {source.name}: {path} is named .gz but is not a valid gzip file ({e}); "
                                "decompress it or fix its name.") from e
    return raw


def decode_text(source: CalibSource, path: Path, raw: bytes) -> str:
    """`raw` as UTF-8 text; binary data (NUL bytes, invalid UTF-8) is refused with the file's name."""
    what = f"{source.flag} {source.name}: {path}"
    if raw[:2] == b"\x1f\x8b":
        raise MoePruneError(f"{what} is gzip-compressed data; name it *.gz (e.g. .txt.gz, .jsonl.gz) or decompress it.")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise MoePruneError(f"{what} is not text (NUL byte at offset {nul}); pass UTF-8 text files (.txt, .jsonl, or "
                            "the same gzipped as .gz).")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoePruneError(f"{what} is not UTF-8 text (invalid byte {raw[e.start]:#04x} at offset {e.start}); "
                            "convert it to UTF-8 (e.g. `iconv -t utf-8`) or pass another file.") from e


def _jsonl_documents(source: CalibSource, text: str, text_field: str, chat_template: bool, tokenizer) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoePruneError(f"{source.flag} {source.name}: {source.path} line {lineno} is not JSON ({e}).") from e
        if chat_template and isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise MoePruneError(f"{source.flag} {source.name}: --chat-template needs a tokenizer with a chat "
                                    "template.")
            docs.append(tokenizer.apply_chat_template(obj["messages"], tokenize=False))
        elif isinstance(obj, dict) and isinstance(obj.get(text_field), str):
            docs.append(obj[text_field])
        else:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise MoePruneError(
                f"{source.flag} {source.name}: {source.path} line {lineno} has no string field {text_field!r} "
                f"(it has {keys}); choose the field with --text-field"
                + (" or use --chat-template for 'messages'." if isinstance(obj, dict) and "messages" in obj else ".")
            )
    return docs


SAMPLE_ABOVE = 16  # characters of text per needed token above which windows are sampled from random pieces


def split_pieces(docs: list[str], chars: int) -> list[tuple[str, bool]]:
    """Documents -> contiguous pieces of about `chars` characters, cut after a newline (else after a space, else
    anywhere) at or after each multiple of `chars`; (text, ends its document)."""
    out = []
    for doc in docs:
        start = 0
        while len(doc) - start > 2 * chars:
            cut = next((c + 1 for c in (doc.find(sep, start + chars, start + 2 * chars) for sep in ("\n", " "))
                        if c >= 0), start + chars)
            out.append((doc[start:cut], False))
            start = cut
        out.append((doc[start:], True))
    return out


def _tokenise(pieces: list[tuple[str, bool]], order: list[int], tokenizer: Any, eos: int | None,
              cache: TokenCache, stop: int | None = None) -> tuple[list[int], int]:
    """Concatenate the ids of pieces in `order` (EOS after a document's last piece) until `stop` tokens; returns
    (stream, pieces used). Ids come from `cache` when there, are tokenised and cached otherwise."""
    stream: list[int] = []
    used = 0
    for i in order:
        ids = cache.get(i)
        if ids is None:
            ids = tokenizer(pieces[i][0], add_special_tokens=False)["input_ids"]
            cache.put(i, ids)
        stream.extend(ids)
        if pieces[i][1] and eos is not None:
            stream.append(int(eos))
        used += 1
        if stop is not None and len(stream) >= stop:
            break
    cache.save()
    return stream, used


def _sampled_windows(source: CalibSource, docs: list[str], content: str, tokenizer: Any, cfg: CalibConfig,
                     options: dict) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """Large sources: ([N, L] windows, [M, L] held-out windows or None, tokens tokenised), or None when all the
    pieces give fewer than N·L tokens. Scored windows come first in the seeded piece order, held-out ones after,
    so `held_out` never changes the scored windows."""
    L, N = cfg.seq_len, cfg.samples
    eos = options["eos"]
    pieces = split_pieces(docs, 8 * L)
    cache = TokenCache(TokenCache.key(content, tokenizer, {**options, "pieces": 8 * L}))
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    stream, used = _tokenise(pieces, order, tokenizer, eos, cache, stop=N * L)
    if len(stream) < N * L:
        return None
    rest, more = _tokenise(pieces, order[used:], tokenizer, eos, cache, stop=cfg.held_out * L) if cfg.held_out \
        else ([], 0)
    after = torch.tensor(stream[N * L :] + rest, dtype=torch.long)  # [S'] tokens after the scored windows
    held = after[: min(cfg.held_out, len(after) // L) * L].view(-1, L)  # [M, L]
    logger.info("calibration set %r: %d of %d text pieces tokenised (%d tokens) for %d + %d windows of %d",
                source.name, used + more, len(pieces), len(stream) + len(rest), N, held.shape[0], L)
    windows = torch.tensor(stream[: N * L], dtype=torch.long).view(N, L)  # [N, L]
    return windows, (held if held.shape[0] else None), len(stream) + len(rest)


def build_set(source: CalibSource, tokenizer: Any, cfg: CalibConfig) -> CalibSet:
    """Tokenise, sample and pad one source (see the module docstring for the exact rule)."""
    docs, raw = read_documents(source, cfg.text_field, cfg.chat_template, tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    L, N = cfg.seq_len, cfg.samples
    content = hashlib.sha256(raw).hexdigest()
    options = {"text_field": cfg.text_field, "chat_template": cfg.chat_template, "eos": eos}
    digest = hashlib.sha256(raw)
    digest.update(json.dumps([L, N, cfg.seed, cfg.text_field, cfg.chat_template]).encode())
    if sum(len(d) for d in docs) > SAMPLE_ABOVE * N * L:  # not held_out: it must not change the scored windows
        got = _sampled_windows(source, docs, content, tokenizer, cfg, options)
        if got is not None:
            windows, held, tokenised = got
            digest.update(json.dumps(["pieces", 8 * L]).encode())  # another rule, other windows
            return CalibSet(source.name, windows, torch.ones_like(windows), digest.hexdigest(), str(source.path),
                            len(docs), tokenised, meta={"sampled": True}, held_out_ids=held)
    cache = TokenCache(TokenCache.key(content, tokenizer, {**options, "pieces": 0}))
    stream, _ = _tokenise([(d, True) for d in docs], list(range(len(docs))), tokenizer, eos, cache)
    if len(stream) < 2:
        raise MoePruneError(f"{source.flag} {source.name}: {source.path} gives only {len(stream)} token(s); add text.")
    ids = torch.tensor(stream, dtype=torch.long)  # [S]
    full = len(stream) // L
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(full, generator=g)
    order = perm[: min(N, full)].sort().values  # chosen window indices
    apart = perm[min(N, full) : min(N, full) + cfg.held_out].sort().values  # never drawn: held apart
    rows = [ids[i * L : (i + 1) * L] for i in order.tolist()]
    masks = [torch.ones(L, dtype=torch.long) for _ in rows]
    tail = ids[full * L :]
    if len(rows) < N and tail.numel() >= 2:
        pad = next((int(t) for t in (getattr(tokenizer, "pad_token_id", None), eos) if t is not None), 0)
        rows.append(torch.cat([tail, torch.full((L - tail.numel(),), pad, dtype=torch.long)]))
        masks.append(torch.cat([torch.ones(tail.numel(), dtype=torch.long), torch.zeros(L - tail.numel(),
                                                                                          dtype=torch.long)]))
    if len(rows) < N and cfg.warn_short:
        logger.warning("calibration set %r: %d tokens give %d sequence(s) of %d, fewer than --samples %d",
                       source.name, len(stream), len(rows), L, N)
    held = torch.stack([ids[i * L : (i + 1) * L] for i in apart.tolist()]) if len(apart) else None  # [M, L]
    return CalibSet(source.name, torch.stack(rows), torch.stack(masks), digest.hexdigest(), str(source.path),
                    len(docs), len(stream), meta={"sampled": False}, held_out_ids=held)


def build_sets(cfg: CalibConfig, tokenizer: Any) -> list[CalibSet]:
    """Every source of `cfg`; all are read and checked before any is returned (so errors come early)."""
    return [build_set(s, tokenizer, cfg) for s in cfg.sources]

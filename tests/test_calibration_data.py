"""Calibration data: sources, seeded disjoint windows (checked against the token stream by brute force),
padding masks, content hashes, and clear errors for bad or empty data (raised without any model)."""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moeprune.calibration import CalibConfig, CalibSource, build_sets
from moeprune.calibration.data import SAMPLE_ABOVE, build_set, split_pieces
from moeprune.errors import MoePruneError

EOS = 100


@pytest.fixture(scope="module")
def tok():
    vocab = {f"w{i}": i for i in range(100)} | {"</s>": EOS, "<unk>": 101, "<pad>": 102}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    return fast


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def test_windows_are_disjoint_seeded_slices_of_the_stream(tok, tmp_path):
    """A small source (at most SAMPLE_ABOVE characters per needed token) is tokenised whole, in document order."""
    docs = [list(range(i, i + 37)) for i in range(0, 60, 7)]
    (tmp_path / "d").mkdir()
    for k, d in enumerate(docs):
        (tmp_path / "d" / f"{k:02d}.txt").write_text(words(d))
    stream = [t for d in docs for t in d + [EOS]]  # brute force: documents, each followed by EOS
    cfg = CalibConfig((CalibSource.parse(f"mix={tmp_path / 'd'}"),), samples=6, seq_len=16, seed=3)
    assert sum(len(words(d)) for d in docs) <= SAMPLE_ABOVE * 6 * 16  # the small-source rule applies
    s = build_sets(cfg, tok)[0]
    assert s.input_ids.shape == (6, 16) and bool(s.attention_mask.all()) and not s.meta["sampled"]
    starts = []
    for row in s.input_ids.tolist():
        hits = [i for i in range(0, len(stream) - 15, 16) if stream[i : i + 16] == row]
        assert len(hits) == 1
        starts.append(hits[0])
    assert len(set(starts)) == 6 and starts == sorted(starts)
    again = build_sets(cfg, tok)[0]
    other = build_sets(CalibConfig(cfg.sources, samples=6, seq_len=16, seed=4), tok)[0]
    assert torch.equal(again.input_ids, s.input_ids) and again.sha256 == s.sha256
    assert not torch.equal(other.input_ids, s.input_ids) and other.sha256 != s.sha256
    assert s.stream_tokens == len(stream) and s.documents == len(docs)


def test_short_data_pads_the_tail(tok, tmp_path):
    (tmp_path / "a.txt").write_text(words(range(21)))  # 21 tokens + EOS = 22 = one window of 16 + tail of 6
    s = build_set(CalibSource.parse(f"a={tmp_path / 'a.txt'}"), tok, CalibConfig(
        (CalibSource("a", tmp_path / "a.txt"),), samples=4, seq_len=16))
    assert s.input_ids.shape == (2, 16)
    assert s.attention_mask[0].all() and s.attention_mask[1].tolist() == [1] * 6 + [0] * 10
    assert s.input_ids[1, :6].tolist() == [16, 17, 18, 19, 20, EOS] and (s.input_ids[1, 6:] == 102).all()
    assert s.tokens == 22


def test_jsonl_field_and_chat_template(tok, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [{"body": "w1 w2"}, {"body": "w3"}]) + "\n")
    cfg = CalibConfig((CalibSource("c", f),), samples=1, seq_len=5, text_field="body")
    assert build_sets(cfg, tok)[0].input_ids.tolist() == [[1, 2, EOS, 3, EOS]]
    with pytest.raises(MoePruneError, match="no string field 'text'.*--text-field"):
        build_sets(CalibConfig((CalibSource("c", f),), samples=1, seq_len=5), tok)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "w7", "content": "w8 w9"}]}) + "\n")
    got = build_sets(CalibConfig((CalibSource("x", chat),), samples=1, seq_len=4, chat_template=True), tok)[0]
    assert got.input_ids.tolist() == [[7, 8, 9, EOS]]
    with pytest.raises(MoePruneError, match="--chat-template"):
        build_sets(CalibConfig((CalibSource("x", chat),), samples=1, seq_len=4), tok)


def test_hash_follows_content(tok, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(words(range(40)))
    cfg = CalibConfig((CalibSource("a", f),), samples=2, seq_len=8)
    h1 = build_sets(cfg, tok)[0].sha256
    f.write_text(words(range(1, 41)))
    assert build_sets(cfg, tok)[0].sha256 != h1


@pytest.mark.parametrize("make, match", [
    (lambda p: "nameonly", "NAME=PATH"),
    (lambda p: f"x={p / 'missing.txt'}", "does not exist"),
    (lambda p: (p / "e.txt").write_text("  \n") and f"e={p / 'e.txt'}", "holds no text"),
    (lambda p: (p / "d").mkdir() or f"d={p / 'd'}", r"holds no \*\.txt"),
    (lambda p: (p / "b.jsonl").write_text('{"text": "w1"}\n{oops\n') and f"b={p / 'b.jsonl'}", "line 2 is not JSON"),
])
def test_bad_calibration_data(tok, tmp_path, make, match):
    spec = make(tmp_path)
    with pytest.raises(MoePruneError, match=match):
        build_sets(CalibConfig((CalibSource.parse(spec),), samples=1, seq_len=4), tok)


def test_config_validation(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("w1")
    src = CalibSource("a", f)
    with pytest.raises(MoePruneError, match="unique"):
        CalibConfig((src, src))
    with pytest.raises(MoePruneError, match="--samples"):
        CalibConfig((src,), samples=0)
    with pytest.raises(MoePruneError, match="--seq-len"):
        CalibConfig((src,), seq_len=1)
    with pytest.raises(MoePruneError, match="at least one --calib"):
        CalibConfig(())


def random_bytes(n: int = 512, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("name, content, match", [
    ("noise.txt", random_bytes(), "is not text"),  # NUL bytes
    ("latin1.txt", "w1 w2 caf\u00e9 w3".encode("latin-1"), r"is not UTF-8 text \(invalid byte 0xe9 at offset 9\)"),
    ("noise.jsonl", b'{"text": "w1"}\n' + random_bytes(), "is not text"),
    ("packed.txt", gzip.compress(b"w1 w2 w3"), "is gzip-compressed data; name it"),
    ("broken.txt.gz", b"w1 w2 w3, not gzip", "is named .gz but is not a valid gzip file"),
    ("noise.txt.gz", gzip.compress(random_bytes()), "is not text"),
], ids=lambda v: v if isinstance(v, str) and "." in v and " " not in v else "")
def test_binary_data_is_refused_with_the_file_name(tok, tmp_path, name, content, match):
    f = tmp_path / name
    f.write_bytes(content)
    for spec in (f"x={f}", f"x={tmp_path}"):  # the file alone, and inside a folder
        if not name.endswith((".txt", ".txt.gz")) and spec.endswith(str(tmp_path)):
            continue  # folders read only *.txt and *.txt.gz
        with pytest.raises(MoePruneError, match=re.escape(str(f)) + ".*" + match):
            build_sets(CalibConfig((CalibSource.parse(spec),), samples=2, seq_len=4), tok)


def test_gzipped_files_read_like_plain_ones(tok, tmp_path):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    text = words(range(37))
    lines = "".join(json.dumps({"text": words(range(i, i + 9))}) + "\n" for i in range(5))
    (plain / "a.txt").write_text(text)
    (packed / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (plain / "b.jsonl").write_text(lines)
    (packed / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (plain / "dir").mkdir(), (packed / "dir").mkdir()
    (plain / "dir" / "1.txt").write_text(words(range(50, 60)))
    (plain / "dir" / "2.txt").write_text(words(range(20, 30)))
    (packed / "dir" / "1.txt").write_text(words(range(50, 60)))  # plain and gzipped files mix in a folder
    (packed / "dir" / "2.txt.gz").write_bytes(gzip.compress(words(range(20, 30)).encode()))

    def sets(folder, gz=""):
        srcs = (CalibSource("a", folder / f"a.txt{gz}"), CalibSource("b", folder / f"b.jsonl{gz}"),
                CalibSource("d", folder / "dir"))
        return build_sets(CalibConfig(srcs, samples=64, seq_len=4), tok)

    for p, g in zip(sets(plain), sets(packed, ".gz"), strict=True):
        assert p.input_ids.tolist() == g.input_ids.tolist() and p.attention_mask.tolist() == g.attention_mask.tolist()
        assert (p.documents, p.stream_tokens, p.sha256) == (g.documents, g.stream_tokens, g.sha256)
    # against the words themselves: the gzipped text file is the stream 0..36 then EOS
    assert sets(packed, ".gz")[0].input_ids.flatten().tolist()[:38] == list(range(37)) + [EOS]


class Spy:
    """The tokenizer, counting the characters it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text, **kw):
        self.chars += len(text)
        return self.tokenizer(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def big_tok():
    """Word-level tokenizer with 6000 distinct words: in the test text, a token id is its position in the source."""
    vocab = {f"u{i}": i for i in range(6000)} | {"</s>": 6000, "<unk>": 6001, "<pad>": 6002}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def test_large_sources_tokenise_only_sampled_pieces(big_tok, tmp_path, monkeypatch):
    """A large source: windows are runs of consecutive source tokens (contiguous text pieces), disjoint from each
    other and from the held-out windows, seeded, drawn from all over the text, and only a small share of the text
    is tokenised; a second run reads every id from the cache (no tokenisation) and gives the same windows."""
    lines = [" ".join(f"u{i}" for i in range(r * 20, r * 20 + 20)) for r in range(300)]  # 6000 tokens, 1 document
    (tmp_path / "big.txt").write_text("\n".join(lines))
    text_chars = len("\n".join(lines))
    L, N, held = 16, 8, 4
    cfg = CalibConfig((CalibSource("big", tmp_path / "big.txt"),), samples=N, seq_len=L, seed=5, held_out=held)
    assert text_chars > SAMPLE_ABOVE * (N + held) * L  # the sampled path applies
    spy = Spy(big_tok)
    s = build_sets(cfg, spy)[0]
    assert s.meta["sampled"] and s.input_ids.shape == (N, L) and bool(s.attention_mask.all())
    assert s.held_out_ids.shape == (held, L)
    assert spy.chars < text_chars / 4, "most of the text must stay untokenised"
    rows = s.input_ids.tolist() + s.held_out_ids.tolist()
    every = [t for row in rows for t in row if t != 6000]
    assert len(every) == len(set(every)), "windows overlap"
    for row in rows:  # brute force: each window is runs of consecutive source tokens, one jump per piece boundary
        jumps = sum(1 for a, b in zip(row[:-1], row[1:], strict=True) if b != a + 1 and 6000 not in (a, b))
        assert jumps <= 1, row
    assert max(every) - min(every) > 6000 // 2, "windows come from all over the text"
    again = Spy(big_tok)
    assert torch.equal(build_sets(cfg, again)[0].input_ids, s.input_ids) and again.chars == 0  # all from the cache
    monkeypatch.setenv("MOEPRUNE_TOKEN_CACHE", "off")
    uncached = Spy(big_tok)
    assert torch.equal(build_sets(cfg, uncached)[0].input_ids, s.input_ids) and uncached.chars == spy.chars
    other = build_sets(CalibConfig(cfg.sources, samples=N, seq_len=L, seed=6, held_out=held), big_tok)[0]
    assert not torch.equal(other.input_ids, s.input_ids) and other.sha256 != s.sha256


def test_token_cache_key_follows_content_and_tokenizer(tok, big_tok, tmp_path, monkeypatch):
    """The cache never serves ids of other text or of another tokenizer; files are whole (written atomically)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEPRUNE_TOKEN_CACHE", str(cache))
    f = tmp_path / "a.txt"
    f.write_text(words(range(40)))
    cfg = CalibConfig((CalibSource("a", f),), samples=2, seq_len=8)
    first = build_sets(cfg, tok)[0]
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob(".tmp-*"))
    f.write_text(words(range(1, 41)))
    second = build_sets(cfg, tok)[0]
    assert second.input_ids.tolist() != first.input_ids.tolist()  # new text, new ids (not the cached ones)
    stream = list(range(1, 41)) + [EOS]  # brute force: the new text's tokens
    assert all(any(stream[i : i + 8] == row for i in range(0, 41, 8)) for row in second.input_ids.tolist())
    other = Spy(big_tok)
    build_sets(cfg, other)
    assert other.chars > 0 and len(list(cache.glob("*.safetensors"))) == 3


def test_split_pieces_are_contiguous_and_cut_after_newlines():
    doc = "\n".join(f"line {i} " + "x" * (i % 7) for i in range(200))
    pieces = split_pieces([doc, "short"], 100)
    assert "".join(t for t, _ in pieces[:-1]) == doc and pieces[-1] == ("short", True)
    assert [end for _, end in pieces].count(True) == 2
    assert all(t.endswith("\n") for t, end in pieces if not end)
    assert all(100 <= len(t) <= 200 for t, end in pieces if not end)

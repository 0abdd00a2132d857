"""Next-token NLL, correct predictions and counted positions per window, a chunk of positions at a time.

For a window x_1..x_L with attention mask m, position t predicts x_{t+1} and counts when m_t = m_{t+1} = 1:

    nll_b = Σ_t −log softmax(logits_{b,t})[x_{b,t+1}]   (float64),   correct_b = #{argmax logits_{b,t} = x_{b,t+1}}

Logits are [B, L, V]: at a real vocabulary (V ≈ 150 k) and calibration windows (B = 8, L = 512) that is 2.5 GB in
float32, and the float64 copy and log-softmax the sums need are twice that each. So positions are scored c at a time, c
chosen so that one chunk's float64 logits and log-probabilities stay within `SCORE_BYTES`:

- `score_head`: the logits of c positions at a time from the model's own final norm, head and logit
  post-processing (`calibration.engine.head_logits` with `logits_to_keep` = those positions; the layers are not
  re-run): peak memory ≈ SCORE_BYTES whatever V, for the layer-by-layer paths (the `auto` judge, held-out scores).
  A model class without `logits_to_keep` gets all its logits at once and only the float64 work is chunked.
- `score_model`: an in-memory model: its decoder layers run once (the logits of one position), the last layer's
  output is captured, then `score_head`. A model moeprune has no adapter for gets its whole logits (`score_logits`).
- `score_logits`: logits already computed: the float64 work is chunked.

Both give the numbers of one float64 log-softmax over every position (the same per-position values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SCORE_BYTES = 256 << 20  # float64 temporaries of one chunk: logits and log-probabilities [B, c, V]


@dataclass
class RowScores:
    """Per window [B]: NLL sum (float64), correct predictions and counted positions (int64)."""

    nll: torch.Tensor
    correct: torch.Tensor
    counted: torch.Tensor

    def totals(self) -> tuple[float, int, int]:
        """(NLL sum, correct predictions, counted positions) over the windows."""
        return float(self.nll.sum()), int(self.correct.sum()), int(self.counted.sum())


def chunk_positions(rows: int, vocab: int, max_bytes: int = SCORE_BYTES) -> int:
    """Positions per chunk: c·rows·vocab float64 logits and log-probabilities within `max_bytes` (at least 1)."""
    return max(1, max_bytes // (16 * rows * vocab))


def _score_chunk(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, start: int,
                 out: RowScores) -> None:
    """Add positions start..start+c−1 (logits [B, c, V]) to `out`: they predict ids[:, start+1 : start+c+1]."""
    c = logits.shape[1]
    target = ids[:, start + 1 : start + c + 1]  # [B, c]
    counted = (mask[:, start : start + c] * mask[:, start + 1 : start + c + 1]).bool()  # [B, c]
    logp = torch.log_softmax(logits.double(), dim=-1)  # [B, c, V]
    nll = -logp.gather(-1, target[..., None])[..., 0]  # [B, c]
    out.nll += (nll * counted).sum(1)
    out.correct += ((logp.argmax(-1) == target) & counted).sum(1)
    out.counted += counted.sum(1)


def _empty(rows: int, device: torch.device) -> RowScores:
    """Zero sums on the logits' device (moved to the host once, by `_host`)."""
    return RowScores(*(torch.zeros(rows, dtype=d, device=device) for d in (torch.float64, torch.long, torch.long)))


def _host(out: RowScores) -> RowScores:
    return RowScores(out.nll.cpu(), out.correct.cpu(), out.counted.cpu())


def score_logits(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 max_bytes: int = SCORE_BYTES) -> RowScores:
    """Scores of logits [B, L, V] for ids / mask [B, L], the float64 work `chunk_positions` positions at a time."""
    ids, mask = ids.to(logits.device), mask.to(logits.device)
    B, L, V = logits.shape
    out, c = _empty(B, logits.device), chunk_positions(B, V, max_bytes)
    for start in range(0, L - 1, c):
        _score_chunk(logits[:, start : min(start + c, L - 1)], ids, mask, start, out)
    return _host(out)


def head_rows(model: nn.Module) -> int:
    """Rows of the model's head (its config's vocabulary when the class exposes no output embeddings)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def score_model(model: nn.Module, adapter, inputs: dict[str, torch.Tensor], max_bytes: int = SCORE_BYTES) -> RowScores:
    """Scores of an in-memory model's forward on `inputs` (module docstring); `adapter` None: whole logits."""
    from moeprune.calibration.engine import last_hidden, takes_logits_to_keep

    if adapter is None or not takes_logits_to_keep(model):
        logits = model(**inputs, use_cache=False).logits  # [B, L, V]
        return score_logits(logits, inputs["input_ids"], inputs["attention_mask"], max_bytes)
    return score_head(model, adapter, inputs, last_hidden(model, adapter, inputs), max_bytes)


def score_head(model: nn.Module, adapter, inputs: dict[str, torch.Tensor], hidden: torch.Tensor,
               max_bytes: int = SCORE_BYTES) -> RowScores:
    """Scores of the last decoder layer's output `hidden` [B, L, H] through the model's own head, the logits of
    `chunk_positions` positions at a time (module docstring)."""
    from moeprune.calibration.engine import head_logits, takes_logits_to_keep

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if not takes_logits_to_keep(model):
        return score_logits(head_logits(model, adapter, inputs, hidden), ids, mask, max_bytes)
    B, L = ids.shape
    out, c = None, chunk_positions(B, head_rows(model), max_bytes)
    for start in range(0, L - 1, c):
        keep = torch.arange(start, min(start + c, L - 1), device=hidden.device)  # [c] positions
        logits = head_logits(model, adapter, inputs, hidden, logits_to_keep=keep)  # [B, c, V]
        if out is None:  # the sums, ids and mask live where the head runs
            out, ids, mask = _empty(B, logits.device), ids.to(logits.device), mask.to(logits.device)
        _score_chunk(logits, ids, mask, start, out)
    return _host(out if out is not None else _empty(B, torch.device("cpu")))

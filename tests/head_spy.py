"""A recorder of the head's logits calls, for tests that check the head runs a chunk of positions at a time."""

from __future__ import annotations

from moeprune.calibration import engine


def spy_head_logits(monkeypatch, module=engine) -> list[tuple[int, bool]]:
    """Wrap `module.head_logits` (where the code under test looks it up); every call appends (positions in its
    output [B, c, V], whether that output carries an autograd graph) to the returned list."""
    calls: list[tuple[int, bool]] = []
    original = engine.head_logits

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((out.shape[1], out.requires_grad))
        return out

    monkeypatch.setattr(module, "head_logits", spy)
    return calls

"""Shared by the merge-math tests: small random experts, and a SwiGLU expert written independently of moeprune
(the reference the merges and alignments are checked against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

I, H = 24, 16


def make_expert(seed: int, inter: int = I, hidden: int = H, bias: bool = False, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    e = {"gate": torch.randn(inter, hidden, generator=g), "up": torch.randn(inter, hidden, generator=g),
         "down": torch.randn(hidden, inter, generator=g)}
    if bias:
        e |= {"gate_bias": torch.randn(inter, generator=g), "up_bias": torch.randn(inter, generator=g),
              "down_bias": torch.randn(hidden, generator=g)}
    return {k: v.to(dtype) for k, v in e.items()}


def random_perm(seed: int, n: int = I) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def expert_forward(e: dict, x: torch.Tensor) -> torch.Tensor:
    """Reference SwiGLU expert, written independently of moeprune: y = down (silu(gate x + b_g) * (up x + b_u)) + b_d.
    x [T, H] -> y [T, H]."""
    x = x.to(torch.float64)
    g = x @ e["gate"].double().T + (e["gate_bias"].double() if "gate_bias" in e else 0)  # [T, I]
    u = x @ e["up"].double().T + (e["up_bias"].double() if "up_bias" in e else 0)  # [T, I]
    y = (F.silu(g) * u) @ e["down"].double().T  # [T, H]
    return y + (e["down_bias"].double() if "down_bias" in e else 0)


def inputs(seed: int = 123, t: int = 32, hidden: int = H) -> torch.Tensor:
    return torch.randn(t, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same_function(a: dict, b: dict, tol: float = 1e-6) -> None:
    x = inputs()
    ya, yb = expert_forward(a, x), expert_forward(b, x)
    err = (ya - yb).abs().max().item() / ya.abs().max().item()
    assert err <= tol, f"relative output difference {err:.3g} > {tol}"


def assert_experts_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for role in a:
        assert a[role].dtype == b[role].dtype, role
        assert torch.equal(a[role], b[role]), role

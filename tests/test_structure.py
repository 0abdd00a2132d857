"""Structure discovery and fused styles, against independent references.

- `discover(config)` (meta model) agrees with the eight hand-written adapters' config rules: MoE layers,
  expert count, width; `classify_key` through transformers' conversion mapping agrees with the hand-written
  adapters' regexes on every key of a saved checkpoint.
- every `FusedStyle` reads canonical roles, keeps neurons and appends a zero neuron exactly as a brute-force
  element-by-element construction of the stored tensor says.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeprune.io.checkpoint import Checkpoint
from moeprune.models import get_adapter
from moeprune.models.fused_styles import STYLES
from moeprune.models.structural import StructuralAdapter
from moeprune.models.structure import discover
from moeprune.tiny import FAMILY_CONFIGS, save_tiny, tiny_config

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_matches_hand_written_adapters(family):
    config = tiny_config(family)
    hand = get_adapter(config)
    assert not isinstance(hand, StructuralAdapter)
    s = discover(config)
    assert list(s.moe_layers) == hand.moe_layers()
    assert s.num_experts == hand.num_experts
    assert s.width == hand.expert_width
    assert s.experts_name == hand.experts_name and s.router_name == hand.router_name
    assert set(s.shared_names) <= {"shared_expert", "shared_experts", "shared_expert_gate"}


@pytest.mark.parametrize("family", FAMILIES)
def test_structural_key_roles_match_hand_written(family, tmp_path):
    path = save_tiny(family, tmp_path / family)
    ckpt = Checkpoint.open(path)
    hand = get_adapter(ckpt.config)
    structural = type("Probe", (StructuralAdapter,), {"spec": None})(ckpt.config)
    for key in ckpt.names():
        a, b = hand.classify_key(key), structural.classify_key(key)
        assert a.kind == b.kind, (key, a, b)
        if a.kind != "other":  # the hand-written regexes give no layer for keys outside a MoE block
            assert (a.layer, a.expert) == (b.layer, b.expert), (key, a, b)
        if a.kind == "expert":
            assert a.renamed(7) == b.renamed(7)


def _stored(style, gate, up, down, gate_b, up_b):
    """Brute force: the stored tensors of `style`, element by element, from canonical gate/up [E, I, H],
    down [E, H, I], biases [E, I]."""
    E, I, H = up.shape
    n = 2 * I if style.gated else I
    w = torch.zeros(E, n, H)
    b = torch.zeros(E, n)
    for e in range(E):
        for k in range(I):
            if not style.gated:
                rows = {"up": k}
            elif style.interleaved:
                rows = {"gate": 2 * k, "up": 2 * k + 1}
            else:
                rows = {"gate": k, "up": I + k}
            for role, r in rows.items():
                w[e, r] = (gate if role == "gate" else up)[e, k]
                b[e, r] = (gate_b if role == "gate" else up_b)[e, k]
    d = down.clone()
    if style.transposed:
        w, d = w.transpose(1, 2).contiguous(), d.transpose(1, 2).contiguous()
    return w, d, b


def _module(style, gate, up, down, gate_b, up_b):
    m = nn.Module()
    w, d, b = _stored(style, gate, up, down, gate_b, up_b)
    setattr(m, style.in_name, nn.Parameter(w))
    setattr(m, style.in_bias_name, nn.Parameter(b))
    m.down_proj = nn.Parameter(d)
    return m


@pytest.mark.parametrize("name", sorted(STYLES))
def test_fused_style_against_brute_force(name):
    style = STYLES[name]
    g = torch.Generator().manual_seed(0)
    E, I, H = 3, 5, 4
    gate, up = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    down = torch.randn(E, H, I, generator=g)
    gate_b, up_b = torch.randn(E, I, generator=g), torch.randn(E, I, generator=g)
    m = _module(style, gate, up, down, gate_b, up_b)
    roles = style.roles(m)
    assert torch.equal(roles["up"], up) and torch.equal(roles["down"], down)
    assert torch.equal(roles["up_bias"], up_b)
    assert ("gate" in roles) == style.gated
    if style.gated:
        assert torch.equal(roles["gate"], gate) and torch.equal(roles["gate_bias"], gate_b)
    assert style.width(m) == I
    # keep neurons idx[e] (per expert, in that order) == brute force on the canonical tensors
    idx = torch.tensor([[4, 0], [1, 2], [3, 3]])
    pick = [[int(j) for j in row] for row in idx]
    want = _module(style, *(torch.stack([t[e][pick[e]] for e in range(E)]) for t in (gate, up)),
                   torch.stack([down[e][:, pick[e]] for e in range(E)]),
                   *(torch.stack([t[e][pick[e]] for e in range(E)]) for t in (gate_b, up_b)))
    style.take_neurons(m, idx)
    for n in (style.in_name, style.in_bias_name, "down_proj"):
        assert torch.equal(getattr(m, n), getattr(want, n)), n
    assert style.resized_shapes(m, 7)[style.in_name][2 if style.transposed else 1] == (14 if style.gated else 7)
    # append a zero neuron == brute force with zeros at neuron I'
    z = _module(style, *(torch.cat([t, torch.zeros(E, 1, H)], 1) for t in (torch.stack(
        [gate[e][pick[e]] for e in range(E)]), torch.stack([up[e][pick[e]] for e in range(E)]))),
        torch.cat([torch.stack([down[e][:, pick[e]] for e in range(E)]), torch.zeros(E, H, 1)], 2),
        *(torch.cat([torch.stack([t[e][pick[e]] for e in range(E)]), torch.zeros(E, 1)], 1) for t in (gate_b, up_b)))
    style.append_zero_neuron(m)
    for n in (style.in_name, style.in_bias_name, "down_proj"):
        assert torch.equal(getattr(m, n), getattr(z, n)), n

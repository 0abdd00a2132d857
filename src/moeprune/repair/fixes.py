"""The repairs: each accumulates statistics over one layer's records (`capture.Record`) and proposes new tensors.

    obs         after neuron removal, per expert j (teacher slot s, kept neurons R ⊂ 0..I−1 of s):
                  G_j = Σ_{t→j} w_t² h_t h_tᵀ,  h_t = teacher expert s's full-width activation on x_t
                  down'_j = W_s G_{:,R} (G_RR + λ)⁻¹                               (`lstsq.obs_update`)
    compensate  after any cut, per surviving expert j, on the tokens routed to it (w = the student's weights,
                s_t = Σ_k w_t,k, r_t = U_T(t) − U_S(t) the experts' missing output):
                  ΔW_j = argmin Σ_{t→j} w_t,j² ‖r_t / s_t − ΔW_j h_t‖² = A_j (G_j + λ)⁻¹     (`lstsq.ridge`)
                  A_j = Σ w² (r/s) hᵀ,  G_j = Σ w² h hᵀ,   down'_j = down_j + ΔW_j
                Each expert explains its weight's share of the residual: if every ΔW_j h = r/s exactly, the block
                gains Σ_j w_j r/s = r. Tokens the cut did not touch have r = 0 and pull ΔW toward 0.
                After a merge this is the least-squares re-fit of each merged expert's down projection against
                the outputs its group gave (the teacher's), on its tokens.
    router      re-fit the surviving router rows (`router.py`).
A fix proposes; `run.py` measures the block error at steps α and keeps the best (α = 0: the fix is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.models.base import MoEAdapter
from moeprune.registry import Registry
from moeprune.repair.capture import Record
from moeprune.repair.lstsq import obs_update, ridge


@dataclass
class Proposal:
    experts: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # expert -> role -> new value
    router: dict[str, torch.Tensor] = field(default_factory=dict)  # router tensor name -> new value


@dataclass
class LayerCtx:
    """What a fix sees of layer `layer`: both blocks, their adapters, and where the student's experts came from."""

    layer: int
    teacher_block: nn.Module
    student_block: nn.Module
    teacher: MoEAdapter
    student: MoEAdapter
    slots: list[int]  # student expert i came from teacher expert slots[i]
    positions: dict[int, list[int]]  # teacher slot -> teacher neuron positions its student expert keeps
    damp: float
    previous_kind: str  # the kind of the stage being repaired ("experts", "merge", "neurons")


class Fix:
    name = ""
    needs_router_input = False  # records carry the student router's input

    def __init__(self, ctx: LayerCtx):
        self.ctx = ctx

    def accumulate(self, rec: Record) -> None:
        raise NotImplementedError

    def propose(self) -> Proposal:
        raise NotImplementedError


FIXES: Registry[type[Fix]] = Registry("repair kind")


def activation(adapter: MoEAdapter, block: nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
    """Expert j's activation h [n, I] on inputs x [n, H] (the family's own gated or up-only activation)."""
    experts = adapter.experts(block)
    roles = adapter.expert_views(block, j)
    g = F.linear(x, roles["gate"], roles.get("gate_bias")) if "gate" in roles else None  # [n, I]
    u = F.linear(x, roles["up"], roles.get("up_bias"))  # [n, I]
    return adapter.expert_glu(experts)(g, u)


def routed(rec: Record, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token rows, their weight) of the tokens the student routes to expert j."""
    tok, slot = torch.where(rec.idx == j)
    return tok, rec.w[tok, slot]


class Obs(Fix):
    name = "obs"

    def __init__(self, ctx: LayerCtx):
        super().__init__(ctx)
        if ctx.previous_kind != "neurons":
            raise MoePruneError(f"obs repairs neuron removal; the stage before is {ctx.previous_kind} removal — use "
                                "kind compensate (or all).")
        self.grams: dict[int, torch.Tensor] = {}
        self._check_rows()

    @torch.no_grad()
    def _check_rows(self) -> None:
        """The student's gate/up rows must be the teacher's at the kept positions (else OBS's h_R is not h[R])."""
        c = self.ctx
        for i, slot in enumerate(c.slots):
            tv, sv = c.teacher.expert_views(c.teacher_block, slot), c.student.expert_views(c.student_block, i)
            p = torch.tensor(c.positions.get(slot, list(range(tv["up"].shape[0]))))
            for role in ("gate", "up"):
                if role in sv and not torch.equal(tv[role][p].to(sv[role].dtype), sv[role]):
                    raise MoePruneError(f"layer {c.layer} expert {i}: its {role} rows are not the teacher's at the "
                                        "kept neurons; obs repairs plain neuron removal only.")

    @torch.no_grad()
    def accumulate(self, rec: Record) -> None:
        c = self.ctx
        for i in rec.idx.unique().tolist():
            if i >= len(c.slots):
                continue
            tok, w = routed(rec, i)
            h = activation(c.teacher, c.teacher_block, c.slots[i], rec.x[tok]).double()  # [n, I] full width
            hw = h * (w.double() ** 2)[:, None]
            self.grams[i] = self.grams.get(i, 0) + hw.T @ h  # [I, I]

    def propose(self) -> Proposal:
        c, out = self.ctx, Proposal()
        for i, G in self.grams.items():
            slot = c.slots[i]
            down = c.teacher.expert_views(c.teacher_block, slot)["down"]  # [H, I]
            kept = c.positions.get(slot, list(range(down.shape[1])))
            out.experts[i] = {"down": obs_update(down, G, kept, c.damp)}  # [H, |R|]
        return out


class Compensate(Fix):
    name = "compensate"

    def __init__(self, ctx: LayerCtx):
        super().__init__(ctx)
        self.A: dict[int, torch.Tensor] = {}
        self.G: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def accumulate(self, rec: Record) -> None:
        c = self.ctx
        r = (rec.u_teacher.double() - rec.u_student.double()) / rec.w.double().sum(-1, keepdim=True).clamp_min(1e-12)
        for i in rec.idx.unique().tolist():
            if i >= c.student.num_experts:
                continue
            tok, w = routed(rec, i)
            h = activation(c.student, c.student_block, i, rec.x[tok]).double()  # [n, I']
            ww = (w.double() ** 2)[:, None]
            self.A[i] = self.A.get(i, 0) + (r[tok] * ww).T @ h  # [H, I']
            self.G[i] = self.G.get(i, 0) + (h * ww).T @ h  # [I', I']

    def propose(self) -> Proposal:
        c, out = self.ctx, Proposal()
        for i, G in self.G.items():
            down = c.student.expert_views(c.student_block, i)["down"].double()  # [H, I']
            out.experts[i] = {"down": down + ridge(self.A[i], G, c.damp)}
        return out


FIXES.register("obs", Obs)
FIXES.register("compensate", Compensate)

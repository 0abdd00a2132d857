"""Router re-fit after expert removal or merging: re-solve the surviving router rows so the kept experts' routing
weights approach the weights that best rebuild the original block output.

On token t the student routes to S(t) with weights g_t [k]; the kept experts' outputs there are Y_t [k, H]
(gate weight 1). The weights that best rebuild the teacher's experts output U_T(t) from those outputs are

    c_t = argmin_c ‖U_T(t) − c Y_t‖² + μ_t ‖c − g_t‖²  =  (Y Yᵀ + μ I)⁻¹ (Y U_T + μ g),   μ_t = 0.1 · tr(Y Yᵀ) / k.
A weight moves by a factor c/g when its logit moves by log(c/g) with the normaliser held (softmax over the selected
or over all kept experts, and, where the scores are small, sigmoid scores), so the logit target of expert j is

    Δℓ_t,j = log(clip(c_t,j, g_t,j / 4, 4 g_t,j) / g_t,j)       (clipped: the first-order step stays local)
and router row j (with its bias, when the router's linear map has one) gets the ridge least-squares change

    Δr_j = argmin Σ_{t→j} g_t,j² (x_tᵀ Δr_j − Δℓ_t,j)² + λ‖Δr_j‖²       (x_t = the router's input, [H] or [H, 1])
Selection-only biases (DeepSeek/GLM `e_score_correction_bias`) are left as they are. Rows of experts no token was
routed to are unchanged. As every fix, the result is kept only at the step α that lowers the measured block error.
"""

from __future__ import annotations

import torch

from moeprune.repair.capture import Record
from moeprune.repair.fixes import FIXES, Fix, LayerCtx, Proposal, activation
from moeprune.repair.lstsq import ridge

CLIP = 4.0


class RouterRefit(Fix):
    name = "router"
    needs_router_input = True

    def __init__(self, ctx: LayerCtx):
        super().__init__(ctx)
        tensors = ctx.student.router_tensors(ctx.student_block)
        E = ctx.student.num_experts
        self.weight = next((n for n, t in tensors.items() if t.dim() == 2 and t.shape[0] >= E), None)
        self.bias = next((n for n, t in tensors.items() if t.dim() == 1 and n.split(".")[-1] == "bias"), None)
        self.A: dict[int, torch.Tensor] = {}
        self.G: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def _outputs(self, rec: Record) -> torch.Tensor:
        """Y [T, k, H]: each selected expert's output (gate weight 1) on its token."""
        c = self.ctx
        T, k = rec.idx.shape
        Y = torch.zeros(T, k, rec.x.shape[1], dtype=torch.float64, device=rec.x.device)
        for j in rec.idx.unique().tolist():
            if j >= c.student.num_experts:
                continue
            tok, slot = torch.where(rec.idx == j)
            views = c.student.expert_views(c.student_block, j)
            h = activation(c.student, c.student_block, j, rec.x[tok])  # [n, I]
            y = torch.nn.functional.linear(h, views["down"], views.get("down_bias"))  # [n, H]
            Y[tok, slot] = y.double()
        return Y

    @torch.no_grad()
    def accumulate(self, rec: Record) -> None:
        if self.weight is None or rec.router_in is None:
            return
        Y = self._outputs(rec)  # [T, k, H]
        g = rec.w.double()  # [T, k]
        gram = Y @ Y.transpose(1, 2)  # [T, k, k]
        k = g.shape[1]
        mu = (0.1 * gram.diagonal(dim1=1, dim2=2).sum(-1) / k).clamp_min(1e-12)  # [T]
        rhs = (Y @ rec.u_teacher.double()[..., None])[..., 0] + mu[:, None] * g  # [T, k]
        eye = torch.eye(k, dtype=torch.float64, device=g.device)
        c = torch.linalg.solve(gram + mu[:, None, None] * eye, rhs)  # [T, k]
        safe = g.clamp_min(1e-12)
        dl = torch.log(torch.minimum(torch.maximum(c, safe / CLIP), safe * CLIP) / safe)  # [T, k]
        x = rec.router_in.double()  # [T, H_r]
        if self.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        for j in rec.idx.unique().tolist():
            if j >= self.ctx.student.num_experts:
                continue
            tok, slot = torch.where(rec.idx == j)
            w = g[tok, slot] ** 2  # [n]
            xj = x[tok]  # [n, H_r(+1)]
            self.A[j] = self.A.get(j, 0) + ((w * dl[tok, slot])[None] @ xj)  # [1, H_r(+1)]
            self.G[j] = self.G.get(j, 0) + (xj * w[:, None]).T @ xj  # [H_r(+1), H_r(+1)]

    def propose(self) -> Proposal:
        c, out = self.ctx, Proposal()
        if not self.G:
            return out
        tensors = c.student.router_tensors(c.student_block)
        weight = tensors[self.weight].detach().double().clone()  # [E (+Z), H_r]
        bias = tensors[self.bias].detach().double().clone() if self.bias is not None else None
        for j, G in self.G.items():
            delta = ridge(self.A[j], G, c.damp)[0]  # [H_r (+1)]
            weight[j] += delta[: weight.shape[1]]
            if bias is not None:
                bias[j] += delta[-1]
        out.router[self.weight] = weight
        if bias is not None:
            out.router[self.bias] = bias
        return out


FIXES.register("router", RouterRefit)

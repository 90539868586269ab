"""``cagrad``: Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021, Algorithm 1; torchjd CAGrad).

torchjd, on the trace-normalised Gram G (as ours; torchjd below its norm_eps on the trace returns 0,
ours keeps the direction at every scale, as the two-objective rule): minimise over the simplex
    F(w) = b^T w + k sqrt(w^T G w),   b = G 1/K (g_w . g0),  k = c ||g0||,  g0 = mean of the rows,
then weights 1/K + (k / ||g_w||) w (out = g0 + c ||g0|| g_w/||g_w||); zero weights where ||g_w|| is
below CAGRAD_NORM_EPS (relative: the Gram is trace-normalised) or within the statistics' rounding of 0
(the two-objective STATIONARY test, reach sum_k w_k ||g_k||).

Solver: exact, by enumeration of supports S (F depends on w only through g_w; the optimal set has a
vertex with affinely independent support). On S with ||g_w|| = r > 0 the KKT conditions
b + (k/r) G w = mu 1 make w = p + tau q affine in tau = r/k, p and q from one bordered solve with two
right-hand sides ([[G_SS, 1], [1^T, 0]], the mgda system), and r^2 = w^T G w gives a quadratic in tau:
(q^T G q - k^2) tau^2 + 2 p^T G q tau + p^T G p = 0. Every positive root with w >= 0 is a candidate,
and so is p (every vertex and face point where tau is free: k = 0 or q = 0); so is the min-norm
point (the optimum when it is at g_w = 0, where F is not smooth). The candidate with the smallest F
wins; ties within 64 K 2^-52 (1 + k) (F is O(1 + k) on the normalised Gram) are
averaged (the optimal set is convex), so a = b gives x = 1/2 as the two-objective closed form.
torchjd's Clarabel stops at a duality gap of 1e-8: its F is never below ours by more than that.

Cases: WEIGHTED; STATIONARY (zero weights) as above; DEGENERATE where a gradient is zero (the
two-objective code; the weights are the rule's: at K = 2 the optimum is g_w = 0, zero weights).
Bound: ||out|| <= ||g0|| + c ||g0|| (times 1.031 from the STATIONARY test, as at K = 2).
"""

from __future__ import annotations

import torch

from ...rules import CAGRAD_NORM_EPS, STATIONARY_REL, Case, RuleSpec
from .base import full_cases
from .mgda import min_norm
from .qp import free_sets

__all__ = ["cagrad_weighting"]

_EPS = 2.0**-52
_FEASIBLE_SLACK = 1e-9  # as qp: a weight may undershoot 0 by this much from the solve's rounding


def _face_candidates(g: torch.Tensor, b: torch.Tensor, k: torch.Tensor):
    """[B, 3M, K] the KKT points (p and the two roots) of every support, and their validity [B, 3M]."""
    n, dim = b.shape
    sets = free_sets(dim, True, g.device)
    m = sets.shape[0]
    f = sets[None].expand(n, m, dim)
    eye = torch.eye(dim, dtype=torch.bool, device=g.device)
    mat = g.new_zeros(n, m, dim + 1, dim + 1)
    mat[..., :dim, :dim] = torch.where(f[..., :, None] & f[..., None, :], g[:, None],
                                       torch.where(eye & ~f[..., None], 1.0, 0.0).to(g.dtype))
    mat[..., :dim, dim] = f.to(g.dtype)
    mat[..., dim, :dim] = 1.0
    rhs = g.new_zeros(n, m, dim + 1, 2)
    rhs[..., dim, 0] = 1.0  # p: the min-norm point of the face's affine hull
    rhs[..., :dim, 1] = torch.where(f, -b[:, None, :], 0.0)  # q: the direction the linear term pulls
    sol, info = torch.linalg.solve_ex(mat, rhs, check_errors=False)
    p, q = sol[..., :dim, 0], sol[..., :dim, 1]
    gq = (g[:, None] @ q[..., None])[..., 0]
    a2 = (q * gq).sum(-1) - (k * k)[:, None]
    a1 = (p * gq).sum(-1)
    a0 = (p * (g[:, None] @ p[..., None])[..., 0]).sum(-1)
    disc = a1 * a1 - a2 * a0
    root = disc.clamp_min(0.0).sqrt()
    safe = torch.where(a2 != 0, a2, 1.0)
    linear = torch.where(a1 != 0, -a0 / (2 * torch.where(a1 != 0, a1, 1.0)), -1.0)
    taus = [torch.where(a2 != 0, (-a1 + sgn * root) / safe, linear) for sgn in (1.0, -1.0)]
    # p itself is a feasible candidate too (every vertex, every face's min-norm point): with k = 0 or
    # q = 0 the quadratic does not fix tau, and extra feasible points never beat the optimum.
    ws = [p.clamp_min(0.0)]
    oks = [(info == 0) & torch.isfinite(p).all(-1) & (p >= -_FEASIBLE_SLACK).all(-1)]
    for tau in taus:
        w = p + tau[..., None] * q
        ok = (info == 0) & (disc >= 0) & (tau > 0) & torch.isfinite(w).all(-1) & (w >= -_FEASIBLE_SLACK).all(-1)
        ws.append(w.clamp_min(0.0))
        oks.append(ok)
    return torch.cat(ws, dim=1), torch.cat(oks, dim=1)


def cagrad_weighting(gram: torch.Tensor, spec: RuleSpec):
    dim = gram.shape[-1]
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    trace = diag.sum(-1)
    g = gram / torch.where(trace > 0, trace, 1.0)[:, None, None]
    b = g.sum(-1) / dim
    k = spec.c * g.sum((-1, -2)).clamp_min(0.0).sqrt() / dim
    ws, ok = _face_candidates(g, b, k)
    ws = torch.cat([ws, min_norm(g)[:, None, :]], dim=1)
    ok = torch.cat([ok, torch.ones_like(ok[:, :1])], dim=1)
    quad = (ws[..., None, :] @ g[:, None] @ ws[..., :, None])[..., 0, 0].clamp_min(0.0)
    obj = torch.where(ok, (ws * b[:, None]).sum(-1) + k[:, None] * quad.sqrt(), torch.inf)
    tie = ok & (obj <= obj.min(1, keepdim=True).values + 64 * dim * _EPS * (1.0 + k[:, None]))
    w = torch.where(tie[..., None], ws, 0.0).sum(1) / tie.sum(1, keepdim=True).to(ws.dtype)
    r2 = (w[:, None, :] @ g @ w[:, :, None])[:, 0, 0].clamp_min(0.0)
    reach = (w * torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0.0).sqrt()).sum(-1)
    still = ~((r2 >= CAGRAD_NORM_EPS * CAGRAD_NORM_EPS) & (r2 > STATIONARY_REL * reach * reach))
    ratio = k / torch.where(still, 1.0, r2).sqrt()
    weights = torch.where(still[:, None], 0.0, 1.0 / dim + ratio[:, None] * w)
    cases = torch.where(still, int(Case.STATIONARY), full_cases(gram, Case.WEIGHTED))
    cases = torch.where((diag == 0).any(-1), int(Case.DEGENERATE), cases).to(torch.int32)
    return weights, cases

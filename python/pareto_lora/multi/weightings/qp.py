"""The exact small-QP solver of the K-objective weightings: batched enumeration of active sets.

Problem: minimise ``v^T A v`` (A [B, K, K] symmetric positive semi-definite, float64) subject to
``v >= lower`` and, with ``simplex``, ``sum(v) = 1``. ``mgda`` is the simplex case with lower = 0
(the min-norm point of the convex hull of the gradients); ``upgrad`` and ``dualproj`` are the
bound case (the dual-cone projection of torchjd, Proposition 1 of arXiv 2406.16232).

Why enumeration: for K <= MAX_OBJECTIVES = 8 there are at most 2^8 free sets, and for each the
KKT system is one linear solve (the fixed variables at their bound, the free ones stationary).
The set of optimal v is a polyhedron bounded below (v >= lower), so it has a vertex, and at a
vertex the free block of the system is nonsingular (its free gradients are linearly, resp.
affinely, independent): the enumeration meets an exact optimum among the nonsingular solves.
Every feasible candidate is a point of the feasible set, so the smallest objective among the
feasible candidates is the optimum; no KKT multiplier test is needed, and a nearly singular
system can only produce a feasible point (harmless) or an infeasible one (discarded).

Rounding: a candidate's objective is trusted only up to ``err = 4 K eps (sum_i |v_i| sqrt(A_ii))^2``
(|A_ij| <= sqrt(A_ii A_jj)); the candidate with the smallest ``objective + err`` wins, and every
candidate whose ``objective - err`` is not above that is taken as a tie: the result is their mean.
The optimal set is convex, so the mean of ties is optimal within the same rounding, and ties
between equivalent supports (duplicate gradients, a = b) give the symmetric answer deterministically
(the mgda weights at a = b are (1/2, 1/2), as the two-objective rule's). A candidate with a huge
v (a nearly singular solve) has a huge err and never wins.

Batched over B on A's device: the loop runs over the 2^K free sets (a fixed count), never over B.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["solve", "free_sets"]

_EPS = 2.0**-52
#: A free variable may undershoot its bound by this much (relative to the scale 1 of the
#: normalised problems the weightings pass) from the solve's rounding; it is then clamped to it.
_FEASIBLE_SLACK = 1e-9


@functools.lru_cache(maxsize=None)
def _free_sets_cpu(k: int, simplex: bool) -> torch.Tensor:
    ids = torch.arange(1 if simplex else 0, 2**k)  # simplex: the empty free set has sum 0, not 1
    return ((ids[:, None] >> torch.arange(k)) & 1).bool()


def free_sets(k: int, simplex: bool, device) -> torch.Tensor:
    """[M, K] bool: every free set the solver tries (M = 2^K - 1 with ``simplex``, else 2^K)."""
    return _free_sets_cpu(k, simplex).to(device)


def _candidates(a: torch.Tensor, lower: torch.Tensor, free: torch.Tensor, simplex: bool):
    """[B, M, R, K] solutions of the KKT systems of the free sets `free` [M, K] for the R problems of
    `lower` [B, R, K] (one factorisation per free set serves the R right-hand sides), validity [B, M, R]."""
    b, r, k = lower.shape
    m = free.shape[0]
    f = free[None].expand(b, m, k)
    ff = f[..., :, None] & f[..., None, :]
    eye = torch.eye(k, dtype=torch.bool, device=a.device)
    # Free rows: sum_{j free} A_ij v_j (+ mu) = -sum_{j fixed} A_ij l_j; fixed rows: v_i = l_i.
    mat = torch.where(ff, a[:, None], torch.where(eye & ~f[..., None], 1.0, 0.0).to(a.dtype))
    fr = free[None, :, None, :]
    fixed_l = torch.where(fr, 0.0, lower[:, None])  # [B, M, R, K]
    rhs = torch.where(fr, -torch.einsum("bij,bmrj->bmri", a, fixed_l), lower[:, None])
    if simplex:
        n = k + 1
        big = a.new_zeros(b, m, n, n)
        big[..., :k, :k] = mat
        big[..., :k, k] = f.to(a.dtype)  # the multiplier of sum(v) = 1 acts on free rows only
        big[..., k, :k] = 1.0
        rhs = torch.cat([rhs, a.new_ones(b, m, r, 1)], dim=-1)
        mat = big
    sol, info = torch.linalg.solve_ex(mat, rhs.transpose(-1, -2), check_errors=False)
    v = sol[..., :k, :].transpose(-1, -2)
    ok = (info == 0)[..., None] & torch.isfinite(v).all(-1) & (v >= lower[:, None] - _FEASIBLE_SLACK).all(-1)
    v = torch.maximum(v, lower[:, None])
    if simplex:
        v = v / torch.where(ok, v.sum(-1), 1.0)[..., None]
    return v, ok


def solve(a: torch.Tensor, lower: torch.Tensor, simplex: bool = False, chunk: int = 64) -> torch.Tensor:
    """Minimiser of v^T A v over v >= lower (and sum(v) = 1 with ``simplex``); see the module doc.

    `a` [B, K, K] float64, scaled so that its diagonal is O(1) (the weightings normalise by the trace),
    `lower` [B, K] or [B, R, K] float64 (R problems sharing A: each free set's system is factorised
    once for all R); the result has the shape of `lower`. With ``simplex`` the feasible set is never
    empty; without it v = lower is always a candidate (the empty free set), so every row gets an answer.
    """
    single = lower.dim() == 2
    lower = lower[:, None] if single else lower
    k = a.shape[-1]
    sets = free_sets(k, simplex, a.device)
    vs, oks = [], []
    for start in range(0, sets.shape[0], chunk):  # a fixed count of chunks: bounded memory per call
        v, ok = _candidates(a, lower, sets[start : start + chunk], simplex)
        vs.append(v)
        oks.append(ok)
    v, ok = torch.cat(vs, dim=1), torch.cat(oks, dim=1)  # [B, M, R, K], [B, M, R]
    obj = torch.einsum("bmri,bij,bmrj->bmr", v, a, v)
    root = torch.diagonal(a, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    err = 4 * k * _EPS * ((v.abs() * root[:, None, None, :]).sum(-1) ** 2 + 1e-300)
    upper = torch.where(ok, obj + err, torch.inf)
    best = upper.min(dim=1, keepdim=True).values
    tie = ok & (obj - err <= best)
    # where, not a product: a discarded candidate may hold NaN (a singular solve)
    out = torch.where(tie[..., None], v, 0.0).sum(1) / tie.sum(1)[..., None].to(v.dtype)
    return out[:, 0] if single else out

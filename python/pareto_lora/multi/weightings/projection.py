"""``upgrad`` and ``dualproj``: projections onto the dual cone of the K gradients (torchjd UPGrad, DualProj).

The dual cone is {x : g_k . x >= 0 for every k}. The projection of J^T u onto it is J^T v with v the
solution of min v^T G' v subject to v >= u (Proposition 1 of Quinton & Rey, arXiv 2406.16232), solved
exactly by :func:`.qp.solve`. As torchjd's QuadprogProjector (and the two-objective rules), G' is
the trace-normalised, regularised Gram G / tr G + reg_eps I; unlike torchjd, at every scale (torchjd
takes a trace below its norm_eps = 1e-4 as zero: docs/rules.md, "Scale").

- ``upgrad``: the mean over k of the projections of the rows, u = e_k / K (torchjd's weights: the
  sum of the projected rows of diag(1/K)). PARETO where some G_ij < 0 (i != j): exactly where some
  row's projection moves (e_k is its own projection iff G' e_k >= 0); else WEIGHTED.
- ``dualproj``: the projection of the mean, u = 1/K. PARETO where a constraint is active
  ((G' u)_k < 0 for some k: u is not in the cone); else WEIGHTED.

Bounds (why nothing amplifies rounding): G' is the Gram of J' = [J / sqrt(t); sqrt(eps) I], so
v^T G' v <= u^T G' u and v >= u >= 0 (||v|| >= ||u||) give ||J^T v|| <= ||J^T u||: each projected row
is at most as long as the row (upgrad: ||out|| <= mean_k ||g_k||), the projected mean at most as long
as the mean (dualproj: ||out|| <= ||mean_k g_k||).
"""

from __future__ import annotations

import torch

from ...rules import Case, RuleSpec
from .base import full_cases
from .qp import solve

__all__ = ["upgrad_weighting", "dualproj_weighting", "regularised"]


def regularised(gram: torch.Tensor, reg_eps: float) -> torch.Tensor:
    """G / tr G + reg_eps I (a zero Gram stays 0 before the regularisation, as torchjd's normalize)."""
    trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return gram / torch.where(trace > 0, trace, 1.0)[:, None, None] + reg_eps * eye


def _conflict(gram: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
    return ((gram < 0) & ~eye).flatten(-2).any(-1)


def upgrad_weighting(gram: torch.Tensor, spec: RuleSpec):
    g, k = gram.shape[0], gram.shape[-1]
    gp = regularised(gram, spec.reg_eps)
    lower = torch.eye(k, dtype=gram.dtype, device=gram.device).expand(g, k, k) / k
    v = solve(gp, lower)  # [G, K, K]: row k the projection of e_k / K (the K problems share G')
    weights = v.sum(1)
    cases = torch.where(_conflict(gram), int(Case.PARETO), full_cases(gram, Case.WEIGHTED)).to(torch.int32)
    return weights, cases


def dualproj_weighting(gram: torch.Tensor, spec: RuleSpec):
    g, k = gram.shape[0], gram.shape[-1]
    gp = regularised(gram, spec.reg_eps)
    u = gram.new_full((g, k), 1.0 / k)
    weights = solve(gp, u)
    moved = ((gp @ u[..., None])[..., 0] < 0).any(-1)
    cases = torch.where(moved, int(Case.PARETO), full_cases(gram, Case.WEIGHTED)).to(torch.int32)
    return weights, cases

"""``nash_mtl``: the Nash bargaining point (Navon et al., ICML 2022, Algorithm 1; torchjd NashMTL).

The weights solve G w = 1/w elementwise, w > 0: the stationary point of the strictly convex
f(w) = w^T G w / 2 - sum_k log w_k. With w = D^-1 y (D = diag(||g_k||)) that is C y = 1/y on the
correlation matrix C (:mod:`.correlation`): no norm ratio enters the solver. Solver: damped Newton
(Nesterov's step 1/(1 + lambda), lambda the Newton decrement, full steps once lambda < 1/4; f is
self-concordant, so every iterate stays positive), NEWTON_ITERS = 60 iterations from the best
multiple of 1, no data-dependent stop (deterministic, no host sync). Stated tolerance: the residual
max_k |y_k (C y)_k - 1| <= NASH_TOL = 1e-9 wherever the group is not STATIONARY (tested on random
K = 2..8, near-stationary groups included). torchjd approaches the same point with 20 convex
problems solved by ECOS on the Frobenius-normalised Gram and often stops short (docs/rules.md).

At the solution ||out||^2 = y^T C y = K; as torchjd, a norm above ``max_norm`` is scaled down to it
(``max_norm`` 0: no clipping): ||out|| = min(sqrt(K), max_norm) at every input scale.

No solution exists when 0 is in the convex hull of the unit directions; within rounding of that
(min over the simplex of w^T C w <= STATIONARY_REL, the two-objective rule's 1 + cos <= 2
STATIONARY_REL at K = 2) the group is Pareto-stationary: zero weights, STATIONARY. A zero gradient:
DEGENERATE, weight 0, the Nash point of the others (at K = 2, the other's unit vector clipped to
min(1, max_norm), the two-objective rule's; all zero: zero weights).
"""

from __future__ import annotations

import math

import torch

from ...rules import STATIONARY_REL, Case, RuleSpec
from .base import full_cases
from .correlation import correlation
from .mgda import min_norm

__all__ = ["nash_mtl_weighting", "nash_point", "NEWTON_ITERS", "NASH_TOL"]

NEWTON_ITERS = 60
NASH_TOL = 1e-9


def nash_point(c: torch.Tensor) -> torch.Tensor:
    """[G, K] y > 0 with C y = 1/y (within NASH_TOL), for correlation matrices with no Pareto-stationary hull."""
    k = c.shape[-1]
    ones = c.new_ones(c.shape[:-1])
    total = (c.sum((-1, -2))).clamp_min(1e-300)
    y = (k / total).sqrt()[:, None] * ones  # argmin of f over the multiples of 1
    for _ in range(NEWTON_ITERS):  # fixed count: deterministic, no host sync
        grad = (c @ y[..., None])[..., 0] - 1.0 / y
        hess = c + torch.diag_embed(1.0 / (y * y))
        step = -torch.linalg.solve_ex(hess, grad[..., None], check_errors=False)[0][..., 0]
        dec = (-(grad * step).sum(-1)).clamp_min(0.0).sqrt()
        t = torch.where(dec < 0.25, 1.0, 1.0 / (1.0 + dec))
        y = y + t[:, None] * step
    return y


def nash_mtl_weighting(gram: torch.Tensor, spec: RuleSpec):
    k = gram.shape[-1]
    c, norms, zero = correlation(gram)
    w_min = min_norm(c)
    still = ((w_min[..., None, :] @ c @ w_min[..., :, None])[..., 0, 0] <= STATIONARY_REL) & ~zero.all(-1)
    eye = torch.eye(k, dtype=c.dtype, device=c.device)
    y = nash_point(torch.where(still[:, None, None], eye, c))  # a stationary group solves a harmless stand-in
    y = torch.where(zero | still[:, None], 0.0, y)
    norm = (y[..., None, :] @ c @ y[..., :, None])[..., 0, 0].clamp_min(0.0).sqrt()  # ||out||
    limit = spec.max_norm if spec.max_norm > 0 else math.inf
    scale = torch.where(norm > limit, limit / torch.where(norm > 0, norm, 1.0), 1.0)
    weights = scale[:, None] * y / torch.where(zero, 1.0, norms)
    cases = full_cases(gram, Case.WEIGHTED)
    cases = torch.where(still, int(Case.STATIONARY), cases)
    cases = torch.where(zero.any(-1), int(Case.DEGENERATE), cases).to(torch.int32)
    return weights, cases

"""``mgda``: the min-norm point of the convex hull of the K gradients (Desideri 2012; torchjd MGDA).

weights = argmin over the simplex of w^T G w, solved exactly (:func:`.qp.solve`, enumeration of
the 2^K - 1 supports) on the trace-normalised Gram G / tr G (the weights are scale-invariant).
torchjd runs Frank-Wolfe (Algorithm 2 of Sener & Koltun 2018) and stops when its step falls below
``epsilon`` = 1e-3: ours is the exact optimum its iterates approach.

Cases, as the two-objective rule: PARETO; DEGENERATE where a gradient is zero (the weights are still
the min-norm point: all weight on the zero gradients, output 0, as the two-objective closed form
gives lambda = 1 on a zero a). A zero Gram gives the mean 1/K (the two-objective 1/2 at a = b = 0).
"""

from __future__ import annotations

import torch

from ...rules import Case, RuleSpec
from .base import full_cases
from .qp import solve

__all__ = ["mgda_weighting", "min_norm"]


def min_norm(gram: torch.Tensor) -> torch.Tensor:
    """[G, K] simplex weights of the min-norm point for a valid Gram [G, K, K] (any scale)."""
    trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    a = gram / torch.where(trace > 0, trace, 1.0)[:, None, None]
    return solve(a, torch.zeros(gram.shape[:-1], dtype=gram.dtype, device=gram.device), simplex=True)


def mgda_weighting(gram: torch.Tensor, spec: RuleSpec):
    w = min_norm(gram)
    zero = (torch.diagonal(gram, dim1=-2, dim2=-1) == 0).any(-1)
    cases = torch.where(zero, int(Case.DEGENERATE), full_cases(gram, Case.PARETO)).to(torch.int32)
    return w, cases

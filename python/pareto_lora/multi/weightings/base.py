"""What every K-objective weighting shares: the valid Gram it is given, and what becomes of its weights.

A weighting is a function ``(gram [G, K, K] float64, spec) -> (weights [G, K] float64, cases [G] int32)``
that sees only valid Gram matrices (:func:`prepare`) and may return any weights; :func:`finish`
then applies, in the order of the two-objective rule (reference._rule): a weight float32 cannot
apply (rules.term_fits) -> plain sum, NONFINITE; an inactive group -> plain sum, INACTIVE; invalid
statistics (NaN/Inf, a negative squared norm, |G_ij| beyond sqrt(G_ii G_jj) by more than rounding)
-> plain sum, NONFINITE. All of it runs batched on the Gram's device: no host sync, no loop over groups.
"""

from __future__ import annotations

import torch

from ...rules import CAUCHY_SCHWARZ_SLACK, Case, term_fits

__all__ = ["prepare", "finish", "full_cases"]


def full_cases(gram: torch.Tensor, case: Case) -> torch.Tensor:
    """[G] int32 filled with `case`, on the Gram's device."""
    return torch.full(gram.shape[:-2], int(case), dtype=torch.int32, device=gram.device)


def prepare(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the Gram with off-diagonals clamped to +-sqrt(G_ii G_jj) and invalid rows zeroed, invalid [G]).

    Within rounding (CAUCHY_SCHWARZ_SLACK) an off-diagonal beyond the Cauchy-Schwarz bound is
    clamped to it, as the two-objective rule clamps a.b; beyond it the group is invalid.
    """
    g = gram.to(torch.float64)
    diag = torch.diagonal(g, dim1=-2, dim2=-1)
    norms = diag.clamp_min(0).sqrt()
    bound = norms[..., :, None] * norms[..., None, :]
    finite = torch.isfinite(g).flatten(-2).all(-1)
    invalid = ~finite | (diag < 0).any(-1) | (g.abs() > bound * (1.0 + CAUCHY_SCHWARZ_SLACK)).flatten(-2).any(-1)
    eye = torch.eye(g.shape[-1], dtype=torch.bool, device=g.device)
    clamped = torch.where(eye, g, torch.minimum(torch.maximum(g, -bound), bound))
    clamped = torch.where(invalid[..., None, None], 0.0, clamped)  # a harmless stand-in; replaced in finish
    return clamped, invalid


def finish(
    gram: torch.Tensor,
    weights: torch.Tensor,
    cases: torch.Tensor,
    invalid: torch.Tensor,
    active: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights and cases the combine applies (see the module docstring), weights in `dtype`."""
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    one = torch.ones_like(weights)

    def put(mask, case, w, c):
        return torch.where(mask[..., None], one, w), torch.where(mask, torch.full_like(c, int(case)), c)

    fits = (term_fits(weights, norms) & torch.isfinite(weights)).all(-1)
    weights, cases = put(~fits, Case.NONFINITE, weights, cases)
    if active is not None:
        weights, cases = put(~active.to(weights.device), Case.INACTIVE, weights, cases)
    weights, cases = put(invalid, Case.NONFINITE, weights, cases)
    return weights.to(dtype), cases.to(torch.int32)

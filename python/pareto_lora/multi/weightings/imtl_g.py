"""``imtl_g``: IMTL-G (Liu et al., ICLR 2021; generalised in arXiv 2406.16232; torchjd IMTLG).

torchjd: w = pinv(G) d / sum(pinv(G) d), d = (||g_k||): the combination whose projections onto every
unit direction g_k/||g_k|| are equal. With G = D C D (:mod:`.correlation`), pinv(G) d = D^-1 C^+ 1
when C is invertible, so ours is w = D^-1 x / sum(D^-1 x), x = C^+ 1, computed from eigh(C) on the
cosines (no norm ratio enters the solve; eigenvalues below K 2^-52 lambda_max are dropped, as pinv).
At K = 2 it is the two-objective rule's (||b||, ||a||)/(||a|| + ||b||) at every angle: for b = k a
(rank 1) x = (1, 1)/2 still gives it, where torchjd's pinv(G) does not (docs/rules.md, difference 2).

Where the normaliser sum(D^-1 x) is at the statistics' rounding (|s| <= K CAUCHY_SCHWARZ_SLACK
sum|D^-1 x|; e.g. a = -b, where C^+ 1 = 0) the weights would be noise divided by noise; torchjd
returns zero weights below an absolute 1e-12. Ours takes the limit the two-objective rule takes:
w = D^-1 1 / sum(D^-1 1) (equal weights on the unit directions; at a = -b, output 0).

A zero gradient: DEGENERATE, the rule on the others and weight 1 on the zero ones (the two-objective
plain sum (1, 1): the output is torchjd's, which gives the zero row weight 0 through pinv).
Bound: where x >= 0 (always at K = 2), ||out|| = sqrt(1^T x)/|s| <= max_k ||g_k||; for K >= 3, C^+ 1
can have mixed signs, and then ||out|| <= sum|x_k|/|s| <= max_k ||g_k|| / (K CAUCHY_SCHWARZ_SLACK)
(|s| is kept above that fraction of its terms, so the statistics' error moves it by < 1/4 of itself).
"""

from __future__ import annotations

import torch

from ...rules import CAUCHY_SCHWARZ_SLACK, Case, RuleSpec
from .base import full_cases
from .correlation import correlation
from .eigh import eigh

__all__ = ["imtl_g_weighting"]

_EPS = 2.0**-52


def imtl_g_weighting(gram: torch.Tensor, spec: RuleSpec):
    k = gram.shape[-1]
    c, norms, zero = correlation(gram)
    lam, vec = eigh(c)
    keep = lam > k * _EPS * lam[..., -1:]
    coef = torch.where(keep, (vec.transpose(-1, -2) @ torch.ones_like(lam)[..., None])[..., 0]
                       / torch.where(keep, lam, 1.0), 0.0)
    x = (vec @ coef[..., None])[..., 0]
    inv = torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, norms))
    y = torch.where(zero, 0.0, x) * inv
    s = y.sum(-1, keepdim=True)
    noise = s.abs() <= k * CAUCHY_SCHWARZ_SLACK * y.abs().sum(-1, keepdim=True)
    y = torch.where(noise, inv, y)
    s = torch.where(noise, inv.sum(-1, keepdim=True), s)
    weights = torch.where(zero, 1.0, y / torch.where(s == 0, 1.0, s))
    degenerate = zero.any(-1)
    cases = torch.where(degenerate, int(Case.DEGENERATE), full_cases(gram, Case.WEIGHTED)).to(torch.int32)
    return weights, cases

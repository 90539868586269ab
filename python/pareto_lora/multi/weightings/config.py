"""``config``: ConFIG (Liu et al., ICLR 2025, arXiv 2408.11104, Eq. 2; torchjd ConFIG), in weight space.

torchjd: units U = rows / ||rows|| (a zero row stays 0), d = pinv(U) 1, t = d / ||d||,
out = (sum_k g_k . t) t. With C = U U^T (:mod:`.correlation`) and x = C^+ 1: d = U^T x, ||d||^2 =
x^T C x = 1^T x, and sum_k g_k . t = n^T C x / ||d|| (n the norms), so
    out = (n^T C x / 1^T x) sum_k x_k u_k,   weights w_k = (n^T C x / 1^T x) x_k / n_k.
At K = 2 this is the two-objective (||a|| + ||b||)/2 (1/||a||, 1/||b||) at every angle.

Rank and rounding: C^+ drops the eigenvalues of C at or below CAUCHY_SCHWARZ_SLACK (where the
statistics cannot tell them from 0; as aligned_mtl's rank), and where 1 has no component left in
the kept eigenvectors (its squared norm there <= K CAUCHY_SCHWARZ_SLACK; e.g. a = -b), t would be a
direction made of rounding: the weights are then the limit x = 1 with C x = 1, w_k = (sum n)/(K n_k),
which is the two-objective formula (output 0 at a = -b, torchjd's). A zero gradient: DEGENERATE, weight 1,
the rule on the others (the two-objective plain sum; torchjd's output). Bound: ||out|| = |t . sum g_k|
<= sum_k ||g_k||.
"""

from __future__ import annotations

import torch

from ...rules import CAUCHY_SCHWARZ_SLACK, Case, RuleSpec
from .base import full_cases
from .correlation import correlation
from .eigh import eigh

__all__ = ["config_weighting"]


def config_weighting(gram: torch.Tensor, spec: RuleSpec):
    k = gram.shape[-1]
    c, norms, zero = correlation(gram)
    lam, vec = eigh(c)
    ones = torch.where(zero, 0.0, 1.0).to(c.dtype)  # a zero row is not in U: its unit vector is 0
    keep = lam > CAUCHY_SCHWARZ_SLACK
    proj = (vec.transpose(-1, -2) @ ones[..., None])[..., 0]  # V^T 1
    x = (vec @ torch.where(keep, proj / torch.where(keep, lam, 1.0), 0.0)[..., None])[..., 0]
    seen = torch.where(keep, proj * proj, 0.0).sum(-1)  # ||1 in the kept eigenvectors||^2
    noise = seen <= k * CAUCHY_SCHWARZ_SLACK
    x = torch.where(noise[:, None], ones, torch.where(zero, 0.0, x))
    # n^T C x (= n^T 1 where 1 is in the kept range; the limit x = 1 is taken as in that range)
    length = torch.where(noise, norms.sum(-1), (norms[..., None, :] @ c @ x[..., :, None])[..., 0, 0])
    total = x.sum(-1)
    scale = length / torch.where(total > 0, total, 1.0)
    weights = torch.where(zero, 1.0, scale[:, None] * x / torch.where(zero, 1.0, norms))
    weights = torch.where((total > 0)[:, None] | zero, weights, 0.0)
    cases = torch.where(zero.any(-1), int(Case.DEGENERATE), full_cases(gram, Case.WEIGHTED)).to(torch.int32)
    return weights, cases

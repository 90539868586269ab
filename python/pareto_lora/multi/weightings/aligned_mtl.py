"""``aligned_mtl``: Aligned-MTL (Senushkin et al., CVPR 2023, Algorithm 1; torchjd AlignedMTL, scale "min").

torchjd: eigh(G) = V diag(lambda) V^T; the rank r counts the eigenvalues above lambda_max K 2^-52;
B = sqrt(lambda_r) V_r diag(lambda_r..)^-1/2 V_r^T over the top r (lambda_r the smallest kept; r = 0:
B = I); weights B (1/K). Ours does the same on the trace-normalised Gram (B is invariant to G's
scale), with one difference by design, the rank: r is the number of eigenvalues of the correlation
matrix C (:mod:`.correlation`) above CAUCHY_SCHWARZ_SLACK, the rounding within which the statistics
cannot tell dependent gradients from independent ones. At K = 2 that is the two-objective rule's
rank-1 band, |cos| >= 1 - CAUCHY_SCHWARZ_SLACK (eigenvalues of C: 1 +- cos); torchjd's float64
threshold instead jumps from about ||a + b||/2 to about 0 at the last bits of the angle.
Counting on C, not G, also keeps a 1e-6 norm ratio from reading as a lost rank.

A zero gradient: DEGENERATE, weight 1/K (torchjd's rank drops by one there and gives it weight 0;
same output); the rule acts on the others (at K = 2: (1/2, 1/2), the two-objective DEGENERATE mean).
Bound: ||out||^2 = w^T G w = lambda_r (1/K^2) sum over kept of (v.1)^2 <= lambda_r / K <= min_k ||g_k||^2
when r = K (lambda_min <= every diagonal entry); at lower rank ||out|| <= ||mean_k g_k||.
"""

from __future__ import annotations

import torch

from ...rules import CAUCHY_SCHWARZ_SLACK, Case, RuleSpec
from .base import full_cases
from .correlation import correlation
from .eigh import eigh

__all__ = ["aligned_mtl_weighting"]


def aligned_mtl_weighting(gram: torch.Tensor, spec: RuleSpec):
    k = gram.shape[-1]
    c, _, zero = correlation(gram)
    rank = (eigh(c)[0] > CAUCHY_SCHWARZ_SLACK).sum(-1) - zero.sum(-1)  # [G]; identity rows set aside
    trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    lam, vec = eigh(gram / torch.where(trace > 0, trace, 1.0)[:, None, None])  # ascending
    first = (k - rank).clamp(0, k - 1)  # index of the smallest kept eigenvalue
    keep = torch.arange(k, device=gram.device) >= first[:, None]
    scale = lam.gather(-1, first[:, None]).clamp_min(0.0)
    inv_root = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0).clamp_min(1e-300).sqrt(), 0.0)
    mean = gram.new_full(gram.shape[:-1], 1.0 / k)
    proj = (vec.transpose(-1, -2) @ mean[..., None])[..., 0]  # V^T (1/K)
    weights = scale.sqrt() * (vec @ (inv_root * proj)[..., None])[..., 0]
    weights = torch.where((rank == 0)[:, None] | zero, 1.0 / k, weights)
    cases = torch.where(zero.any(-1), int(Case.DEGENERATE), full_cases(gram, Case.WEIGHTED)).to(torch.int32)
    return weights, cases

"""``pcgrad``: Gradient Surgery (Yu et al., NeurIPS 2020, Algorithm 1; torchjd PCGrad), deterministic.

Each gradient g_i is projected, one after the other, onto the normal plane of every g_j it conflicts
with (current . g_j < 0: current -= (current . g_j / ||g_j||^2) g_j), and the K projected gradients
are summed (torchjd's PCGradWeighting adds the weight vectors; it does not average).

The ordering choice. PCGrad (and torchjd) visits the other gradients in a fresh random order for
each i and each call: the result is random for K >= 3. Ours visits them in the fixed cyclic order
i+1, i+2, ..., K-1, 0, ..., i-1: deterministic (same bits every call), the same for every row
(relabelling the objectives by a cyclic shift shifts the weights alike), and one of the orders
torchjd may draw (the parity test pins torchjd's permutation to it). For K = 2 there is one order,
and the rule is the two-objective ``pcgrad``. We did not take the symmetric one-shot variant
(every g_i projected off every conflicting original g_j at once): its steps do not shorten the
gradient, so its output is not bounded by sum_k ||g_k||. Each step here does:
||c - (c.g/||g||^2) g||^2 = ||c||^2 - (c.g)^2/||g||^2, hence ||out|| <= sum_k ||g_k||.

No regularisation: c . g_j < 0 implies g_j != 0 (on the valid Gram, |G_ij| <= sqrt(G_ii G_jj)).
Cases: PARETO where some projection acted, else SUMMED (the weights are all 1: literally the sum).
"""

from __future__ import annotations

import torch

from ...rules import Case, RuleSpec
from .base import full_cases

__all__ = ["pcgrad_weighting"]


def pcgrad_weighting(gram: torch.Tensor, spec: RuleSpec):
    k = gram.shape[-1]
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    weights = torch.zeros_like(diag)
    acted = torch.zeros(diag.shape[0], dtype=torch.bool, device=gram.device)
    for i in range(k):  # a fixed loop over K rows and K - 1 steps, batched over groups
        cur = eye[i].expand_as(diag).clone()
        for step in range(1, k):
            j = (i + step) % k
            inner = (gram[:, j, :] * cur).sum(-1)  # g_j . current
            hit = inner < 0
            cur[:, j] = cur[:, j] - torch.where(hit, inner / torch.where(hit, diag[:, j], 1.0), 0.0)
            acted = acted | hit
        weights = weights + cur
    cases = torch.where(acted, int(Case.PARETO), full_cases(gram, Case.SUMMED)).to(torch.int32)
    return weights, cases

"""What an integration returns: :class:`IntegrationResult` and the metrics derived from statistics.

Shared by every backend (they all return this type) and by the training report.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .rules import Case

__all__ = ["IntegrationResult", "MultiResult", "stats_metrics"]


def stats_metrics(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||a||, ||b||, cos(a, b), ||a||/||b||) per row of [G, 3] statistics, in their dtype.

    cos is 0 where a norm is zero; the ratio is inf where ||b|| = 0 < ||a|| and nan where both are 0.
    A row with a NaN statistic (statistics not taken, e.g. ``traversal="sum_first"``'s unmodulated
    groups or a balancer's one-backward step) gives NaN for all four, never a made-up cos of 0.
    """
    na, nb = stats[:, 0].clamp_min(0).sqrt(), stats[:, 1].clamp_min(0).sqrt()
    denom = na * nb
    cos = torch.where(denom > 0, stats[:, 2] / torch.where(denom > 0, denom, 1.0), 0.0)
    cos = torch.where(stats.isnan().any(dim=1), torch.nan, cos)
    return na, nb, cos, na / nb


class _Fields(NamedTuple):
    out: torch.Tensor  #: the integrated gradient
    stats: torch.Tensor  #: [S, 3] float64 per segment: ||a||^2, ||b||^2, a.b (exact products summed in float64)
    coeffs: torch.Tensor  #: [G, 2] float32 (float64 from the reference on float64 inputs): (alpha, beta) per group
    cases: torch.Tensor  #: [G] int32 case codes per group (see :class:`pareto_lora.Case`)


class IntegrationResult(_Fields):
    """What ``integrate`` returns on every backend. Tensors stay on the device (no host sync).

    A named tuple of four, so ``out, stats, coeffs, cases = reference.integrate(...)`` unpacks it
    (as it did before groups existed); ``group_stats`` ([G, 3] float64, the statistics the rule
    saw) is an attribute outside the tuple. Without ``groups`` every segment is its own group:
    ``group_stats`` equals ``stats`` (a separate tensor) and G = S.
    """

    def __new__(cls, out, stats, coeffs, cases, group_stats=None):
        self = super().__new__(cls, out, stats, coeffs, cases)
        self.__dict__["_group_stats"] = group_stats
        return self

    @property
    def group_stats(self) -> torch.Tensor:
        """[G, 3] float64: each group's statistics, its segments' rows summed left to right from +0.0."""
        given = self.__dict__.get("_group_stats")  # absent after _replace/_make: no groups then
        return self.stats if given is None else given

    @property
    def norm_a(self) -> torch.Tensor:
        return stats_metrics(self.stats)[0]

    @property
    def norm_b(self) -> torch.Tensor:
        return stats_metrics(self.stats)[1]

    @property
    def cosine(self) -> torch.Tensor:
        """cos(a, b) per segment; 0 where a norm is zero."""
        return stats_metrics(self.stats)[2]

    @property
    def ratio(self) -> torch.Tensor:
        """||a|| / ||b|| per segment (inf where ||b|| = 0 < ||a||, nan where both are 0)."""
        return stats_metrics(self.stats)[3]

    @property
    def nonfinite(self) -> torch.Tensor:
        """0-d bool tensor: some segment had NaN/Inf statistics (its gradient is not finite)."""
        return (self.cases == int(Case.NONFINITE)).any()


class MultiResult(NamedTuple):
    """What ``integrate_many`` returns (K objectives). Tensors stay on the device (no host sync).

    ``stats`` and ``group_stats`` are rows of K(K+1)/2 Gram entries in the order of
    :func:`pareto_lora.multi.pairs`; :func:`pareto_lora.multi.gram_matrix` makes them K x K.
    """

    out: torch.Tensor  #: the integrated gradient, sum_k weights[g, k] * grads[k] per segment of group g
    stats: torch.Tensor  #: [S, K(K+1)/2] float64 per segment (exact products summed in float64)
    group_stats: torch.Tensor  #: [G, K(K+1)/2] float64: each group's segments' rows summed left to right
    weights: torch.Tensor  #: [G, K] float32 (float64 on float64 inputs): the weights the combine applied
    cases: torch.Tensor  #: [G] int32 case codes (see :class:`pareto_lora.Case`)

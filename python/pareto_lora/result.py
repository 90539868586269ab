"""What an integration returns: :class:`IntegrationResult` and the metrics derived from statistics.

Shared by every backend (they all return this type) and by the training report.
May import: nothing from the package but :mod:`pareto_lora.rules`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .rules import Case

__all__ = ["IntegrationResult", "stats_metrics"]


def stats_metrics(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||a||, ||b||, cos(a, b), ||a||/||b||) per row of [G, 3] statistics, in their dtype.

    cos is 0 where a norm is zero; the ratio is inf where ||b|| = 0 < ||a|| and nan where both are 0.
    """
    na, nb = stats[:, 0].clamp_min(0).sqrt(), stats[:, 1].clamp_min(0).sqrt()
    denom = na * nb
    cos = torch.where(denom > 0, stats[:, 2] / torch.where(denom > 0, denom, 1.0), 0.0)
    return na, nb, cos, na / nb


class IntegrationResult(NamedTuple):
    """What ``integrate`` returns on every backend. Tensors stay on the device (no host sync).

    A named tuple, so ``out, stats, coeffs, cases = reference.integrate(...)`` unpacks it.
    """

    out: torch.Tensor  #: the integrated gradient
    stats: torch.Tensor  #: [G, 3] float64: ||a||^2, ||b||^2, a.b (exact products summed in float64)
    coeffs: torch.Tensor  #: [G, 2] float32 (float64 from the reference on float64 inputs): (alpha, beta)
    cases: torch.Tensor  #: [G] int32 case codes (see :class:`pareto_lora.Case`)

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

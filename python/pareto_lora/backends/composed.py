"""Grouped integration composed of a backend's three ops (statistics, rule, combine) plus the
group sum of :func:`pareto_lora.reference.group_sums`: what a backend runs for ``groups``,
``poison`` and given ``stats`` until its fused kernel takes them.
May import: :mod:`pareto_lora.reference`, :mod:`pareto_lora.result`, :mod:`pareto_lora.rules`.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from ..result import IntegrationResult
from ..rules import Case, RuleSpec


def integrate(impl, a, b, offsets, out, spec: RuleSpec, active, groups, poison, stats) -> IntegrationResult:
    """Arguments already checked (pareto_lora.checks.check_integrate)."""
    num_segments = offsets.numel() - 1
    if stats is None:
        stats = impl.segment_stats(a, b, offsets)
    else:
        stats = stats.to(torch.float64, copy=True)
    host_groups = None if groups is None else groups.cpu()
    group_stats = stats + 0.0 if host_groups is None else reference.group_sums(stats, host_groups)
    coeffs, cases = impl.rule_coefficients(group_stats, spec, active=active)
    seg_coeffs = coeffs
    if host_groups is not None:
        seg_coeffs = coeffs[reference.segment_groups(host_groups, num_segments).to(coeffs.device)]
    if poison is not None:
        seg_coeffs = seg_coeffs * torch.where(poison, math.nan, 1.0).to(seg_coeffs.dtype)
        cases = torch.where(poison, torch.full_like(cases, int(Case.NONFINITE)), cases)
    out = impl.combine(a, b, offsets, seg_coeffs, out)
    return IntegrationResult(out, stats, coeffs, cases, group_stats)

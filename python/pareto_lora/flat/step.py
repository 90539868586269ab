"""The flat-buffer step: per-unit statistics -> per-group rule -> combine, over a layout's buckets.

Shared by the single-process path, the DDP hook (one bucket at a time) and the sharded paths
(one rank's shards): statistics are sums, so any part of the buffers can compute its share, have
it reduced, and hand the total to :func:`group_rule`.
May import: :mod:`pareto_lora.flat.layout`, :mod:`pareto_lora.ops`, :mod:`pareto_lora.rules`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from .. import ops
from ..rules import Case
from .layout import GradLayout

__all__ = ["FlatStep", "RuleFn", "sum_into_groups", "unit_stats", "group_rule", "flat_step", "poison_cases"]

#: group statistics [G, 3] -> (coeffs [G, 2], cases [G]): the owner's rule with its current settings.
RuleFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclasses.dataclass
class FlatStep:
    """Device tensors of one flat-buffer step: unit and group statistics, coefficients, cases."""

    unit_stats: torch.Tensor  #: [U, 3]: ||g_text||^2, ||g_image||^2, g_text.g_image per unit
    group_stats: torch.Tensor  #: [G, 3]
    coeffs: torch.Tensor  #: [G, 2]: (alpha, beta), out = alpha*g_text + beta*g_image
    cases: torch.Tensor  #: [G] int32 (pareto_lora.Case)
    #: a balancer's quantities of this step, ``{"mimo/sigma_text": 0-d tensor, ...}`` (empty for kernel rules)
    extra: dict = dataclasses.field(default_factory=dict)


def sum_into_groups(stats: torch.Tensor, segment_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[G, 3] statistics of groups made of several segments: row g sums the rows s of `stats` with
    segment_group[s] == g (stats are additive).

    Deterministic on every device: a masked sum over a fixed axis instead of ``index_add_``, whose
    CUDA kernel adds with atomics in a varying order, which would let DDP ranks holding equal
    data disagree in the last bit. The [G, S, 3] temporary is tiny (G, S are group/layer counts).
    """
    groups = torch.arange(num_groups, device=stats.device)
    member = (segment_group.to(stats.device)[None, :] == groups[:, None])[:, :, None]
    return torch.where(member, stats[None, :, :], 0).sum(dim=1)


def unit_stats(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], backend: str = "auto") -> torch.Tensor:
    """Sum over (text_flat, image_flat, unit_offsets) pairs of per-unit statistics -> [U, 3]."""
    total = None
    for a, b, offsets in pairs:
        s = ops.segment_stats(a, b, offsets, backend=backend)
        if total is None:
            total = s.clone() if s.dtype == torch.float64 else s.to(torch.float32)
        else:
            total = total.to(torch.promote_types(total.dtype, s.dtype)) + s
    if total is None:
        raise ValueError("pairs: expected at least one (text, image, offsets) buffer pair")
    return total


def group_rule(stats_per_unit: torch.Tensor, layout: GradLayout, rule_fn: RuleFn) -> FlatStep:
    """Sum unit statistics into the layout's groups and run the rule on each group."""
    group_stats = sum_into_groups(stats_per_unit, layout.unit_group, layout.num_groups)
    coeffs, cases = rule_fn(group_stats)
    return FlatStep(stats_per_unit, group_stats, coeffs, cases)


def poison_cases(cases: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
    """Every case NONFINITE where the 0-d bool `poison` is true (no host sync)."""
    return torch.where(poison, torch.full_like(cases, int(Case.NONFINITE)), cases)


def flat_step(
    text: Sequence[torch.Tensor],
    image: Sequence[torch.Tensor],
    layout: GradLayout,
    rule_fn: RuleFn,
    out: Sequence[torch.Tensor] | None = None,
    poison: torch.Tensor | None = None,
    backend: str = "auto",
    stats_per_unit: torch.Tensor | None = None,
) -> FlatStep:
    """stats (per unit) -> rule (per group) -> combine, on the flat buffers of `layout`'s buckets.

    ``out`` defaults to ``image`` (in place). ``stats_per_unit`` ([U, 3]) replaces the
    statistics pass when the caller has them already (reduced across ranks). ``poison`` is an
    optional 0-d bool device tensor: when true the coefficients become NaN, so the whole output
    is NaN (a GradScaler then skips the step) and every case reads NONFINITE; no host sync.
    """
    out = image if out is None else out
    pairs = [(a, b, bk.unit_offsets) for a, b, bk in zip(text, image, layout.buckets)]
    if stats_per_unit is None:
        stats_per_unit = unit_stats(pairs, backend)
    step = group_rule(stats_per_unit, layout, rule_fn)
    unit_coeffs = step.coeffs[layout.unit_group]
    if poison is not None:
        unit_coeffs = unit_coeffs * torch.where(poison, math.nan, 1.0)
        step.cases = poison_cases(step.cases, poison)
    for (a, b, offsets), o in zip(pairs, out):
        ops.combine(a, b, offsets, unit_coeffs, out=o, backend=backend)
    return step

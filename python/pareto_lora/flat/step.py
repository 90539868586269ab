"""The flat-buffer step: per-unit statistics -> per-group rule -> combine, over a layout's buckets.

A LoRA group is a run of consecutive units, so it is contiguous in every bucket (``GradLayout.
group_offsets``). Which launches run (docs/training_path.md):

* a **kernel rule** (the owner's :class:`~pareto_lora.RuleSpec`, ``python_rule`` None) and one
  bucket: one fused :func:`~pareto_lora.integrate` launch per step, with the bucket's unit
  offsets and the layout's groups: unit statistics, their left-to-right float64 sum into groups,
  the rule per group and the combine, with ``poison`` read on the device;
* a kernel rule over several buckets (dtypes): a group may span buckets, so its statistics are
  the sum over them. One statistics launch per bucket, the unit rows added in bucket order, then
  one fused launch per bucket with those totals given (``stats=``): rule + combine. Every bucket's
  launch sees the same totals, so they all compute the same coefficients;
* a **Python rule** (``python_rule``: the owner needs the statistics before the coefficients,
  e.g. RuleOptions ``stats_ema``/``preserve_norm`` or a balancer): statistics launch, the group
  sum (:func:`sum_into_groups`, the kernel's order), the Python rule, combine launch.

Statistics are sums, so the DDP hook (one bucket at a time) and the sharded paths (one rank's
shards) compute their share, reduce it, and hand the totals back through ``stats_per_unit``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ..backends import resolve_backend
from ..reference import group_sums
from ..rules import Case, RuleSpec
from .layout import GradLayout

__all__ = ["FlatStep", "RuleFn", "StepRule", "PythonRule", "sum_into_groups", "unit_stats", "group_rule", "flat_step",
           "poison_cases", "python_rule_per_unit"]

#: group statistics [G, 3] -> (coeffs [G, 2], cases [G]): a rule computed in Python.
RuleFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


class StepRule(Protocol):
    """The owner's rule as a step reads it, at every step (the owner may replace ``spec`` between steps)."""

    #: the kernel rule: runs inside the fused launch when ``python_rule`` is None
    spec: RuleSpec | None

    @property
    def python_rule(self) -> RuleFn | None:
        """A rule that needs the group statistics in Python first (then it replaces ``spec``), else None."""
        ...


@dataclasses.dataclass
class PythonRule:
    """A :class:`StepRule` that is only a Python function of the group statistics (e.g. a balancer's)."""

    python_rule: RuleFn
    spec: RuleSpec | None = None


@dataclasses.dataclass
class FlatStep:
    """Device tensors of one flat-buffer step: unit and group statistics, coefficients, cases."""

    unit_stats: torch.Tensor  #: [U, 3] float64: ||g_text||^2, ||g_image||^2, g_text.g_image per unit
    group_stats: torch.Tensor  #: [G, 3] float64
    coeffs: torch.Tensor  #: [G, 2]: (alpha, beta), out = alpha*g_text + beta*g_image
    cases: torch.Tensor  #: [G] int32 (pareto_lora.Case)
    #: a balancer's quantities of this step, ``{"mimo/sigma_text": 0-d tensor, ...}`` (empty for kernel rules)
    extra: dict = dataclasses.field(default_factory=dict)


def sum_into_groups(stats: torch.Tensor, segment_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[G, 3] statistics of groups made of several segments: row g is +0.0 plus the rows s with
    segment_group[s] == g, added left to right in segment order (stats are additive).

    The order of the fused kernel (:func:`pareto_lora.reference.group_sums`), so that for float64
    statistics every path gives the same bits, on every device (no atomics: DDP ranks holding
    equal data agree). Another dtype is summed in float64 and returned in its own dtype.
    """
    segment_group = segment_group.to(stats.device)
    # A stable sort keeps each group's segments in their order: its rows become one run.
    order = torch.argsort(segment_group, stable=True)
    counts = torch.bincount(segment_group, minlength=num_groups).cpu()
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return group_sums(stats[order], offsets).to(stats.dtype)


def unit_stats(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], backend: str = "auto") -> torch.Tensor:
    """[U, 3] float64: the per-unit statistics of every (text_flat, image_flat, unit_offsets)
    pair (one statistics launch each), added in the order of the pairs."""
    total = None
    for a, b, offsets in pairs:
        s = resolve_backend(backend, a.device).segment_stats(a, b, offsets)
        total = s.clone() if total is None else total + s
    if total is None:
        raise ValueError("pairs: expected at least one (text, image, offsets) buffer pair")
    return total


def poison_cases(cases: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
    """Every case NONFINITE where the 0-d bool `poison` is true (no host sync)."""
    return torch.where(poison, torch.full_like(cases, int(Case.NONFINITE)), cases)


def python_rule_per_unit(fn: Callable, stats: torch.Tensor, layout: GradLayout, poison=None):
    """A Python rule on the group sums of the unit statistics ``stats``: (group_stats, coeffs, cases,
    the coefficients per unit for the combine launches), NaN and NONFINITE where ``poison`` is true.
    Shared by the two-objective step and the K-objective one (any number of columns)."""
    group_stats = group_sums(stats, layout.group_offsets)
    coeffs, cases = fn(group_stats)
    unit_coeffs = coeffs[layout.unit_group]
    if poison is not None:
        unit_coeffs = unit_coeffs * torch.where(poison, math.nan, 1.0).to(unit_coeffs.dtype)
        cases = poison_cases(cases, poison)
    return group_stats, coeffs, cases, unit_coeffs


def group_rule(pairs, outs, layout: GradLayout, rule: StepRule, impl, poison=None, stats=None) -> FlatStep:
    """The rule per group and the combine over `pairs` (text, image, unit offsets), written to `outs`.

    A kernel rule: one fused launch per bucket (statistics too unless ``stats`` [U, 3] float64 are
    given). A Python rule: the group sum of ``stats`` (required), the rule, one combine per bucket.
    """
    fn = rule.python_rule
    if fn is None:
        res = [impl.integrate(a, b, off, o, rule.spec, active=layout.active, groups=layout.group_offsets,
                              poison=poison, stats=stats) for (a, b, off), o in zip(pairs, outs)]
        # With several buckets every launch had the same totals: the same coefficients.
        return FlatStep(res[0].stats, res[0].group_stats, res[0].coeffs, res[0].cases)
    group_stats, coeffs, cases, unit_coeffs = python_rule_per_unit(fn, stats, layout, poison)
    for (a, b, off), o in zip(pairs, outs):
        impl.combine(a, b, off, unit_coeffs, o)
    return FlatStep(stats, group_stats, coeffs, cases)


def flat_step(
    text: Sequence[torch.Tensor],
    image: Sequence[torch.Tensor],
    layout: GradLayout,
    rule: StepRule,
    out: Sequence[torch.Tensor] | None = None,
    poison: torch.Tensor | None = None,
    backend: str = "auto",
    stats_per_unit: torch.Tensor | None = None,
) -> FlatStep:
    """stats (per unit) -> rule (per group) -> combine, on the flat buffers of `layout`'s buckets.

    ``out`` defaults to ``image`` (in place). ``stats_per_unit`` ([U, 3] float64) replaces the
    statistics pass when the caller has them already (reduced across ranks). ``poison`` is an
    optional 0-d bool device tensor: when true the coefficients become NaN, so the whole output
    is NaN (a GradScaler then skips the step) and every case reads NONFINITE; no host sync.
    The launches per step are listed in the module docstring.
    """
    impl = resolve_backend(backend, layout.device)
    outs = image if out is None else out
    pairs = [(a, b, bk.unit_offsets) for a, b, bk in zip(text, image, layout.buckets)]
    if stats_per_unit is None and (rule.python_rule is not None or len(pairs) > 1):
        stats_per_unit = unit_stats(pairs, backend)
    return group_rule(pairs, outs, layout, rule, impl, poison, stats_per_unit)

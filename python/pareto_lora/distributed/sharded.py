"""Integration of sharded flat buffers: each rank holds a disjoint slice of both objectives.

The statistics are sums, so each rank computes them on its shards (the statistics launch), one
all-reduce of the small table makes them global -- the launch boundary: the rule needs the
global statistics -- and one fused launch per rank runs the rule and the combine on its shards
with those statistics given (``stats=``); zero padding adds nothing. When the segments' groups
are not runs of consecutive segments, the fused op cannot take them: the group statistics are
summed locally (in the kernel's order), all-reduced, and the rule and the combine run as two ops.
(:class:`pareto_lora.distributed.fsdp.FSDPSync` applies the same idea to FSDP2 models.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..backends import resolve_backend
from ..flat import sum_into_groups
from ..result import IntegrationResult
from ..rules import DEFAULT_RULE, RuleSpec, rule_keywords

__all__ = ["sharded_integrate"]


@rule_keywords
def sharded_integrate(
    a_shard: torch.Tensor,
    b_shard: torch.Tensor,
    offsets_local: torch.Tensor,
    out: torch.Tensor | None = None,
    rule: RuleSpec = DEFAULT_RULE,
    active: torch.Tensor | None = None,
    segment_group: torch.Tensor | None = None,
    group=None,
    backend: str = "auto",
) -> IntegrationResult:
    """:func:`pareto_lora.integrate` on one rank's shards of two flat gradient buffers.

    ``offsets_local`` marks this rank's part of every segment (an empty segment where the rank
    holds none of it) and must cover the whole shard: zero padding may sit in any segment,
    as zeros add nothing to the statistics. ``segment_group`` (int64 [S], optional) maps segments to groups, so a
    group may be several segments (e.g. one per parameter shard); without it every segment is
    its own group. The statistics are all-reduced (sum) over the process group ``group`` -- the
    only communication -- and the returned ``stats`` are the global ones (per group with
    ``segment_group``); ``out`` (default: a new tensor) receives this rank's shard of the
    integrated gradient. The rule takes every option of :func:`pareto_lora.integrate` (``rule``
    a name with ``tau``, ``gamma``, ``symmetric``, ``margin``, or one RuleSpec).
    """
    spec = rule  # one RuleSpec (rules.rule_keywords made it from the loose keywords)
    if not isinstance(a_shard, torch.Tensor) or not isinstance(b_shard, torch.Tensor):
        raise ValueError("a_shard, b_shard: expected tensors (this rank's shards of the two gradients)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sharded_integrate: torch.distributed is not initialised (call init_process_group first)")
    impl = resolve_backend(backend, a_shard.device)
    if out is None:
        out = torch.empty_like(a_shard)
    stats = impl.segment_stats(a_shard, b_shard, offsets_local)
    if segment_group is None:
        dist.all_reduce(stats, group=group)
        res = impl.integrate(a_shard, b_shard, offsets_local, out, spec, active=active, stats=stats)
        return IntegrationResult(res.out, stats, res.coeffs, res.cases, res.group_stats)
    segment_group = _check_segment_group(segment_group, stats.shape[0], active, stats.device)
    num_groups = active.numel() if active is not None else int(segment_group.max()) + 1 if segment_group.numel() else 0
    groups = _runs(segment_group, num_groups)
    if groups is not None:  # groups are runs of segments: rule + combine in one launch
        dist.all_reduce(stats, group=group)
        res = impl.integrate(a_shard, b_shard, offsets_local, out, spec, active=active, groups=groups, stats=stats)
        return IntegrationResult(res.out, res.group_stats, res.coeffs, res.cases, res.group_stats)
    group_stats = sum_into_groups(stats, segment_group, num_groups)
    dist.all_reduce(group_stats, group=group)
    coeffs, cases = impl.rule_coefficients(group_stats, spec, active=active)
    impl.combine(a_shard, b_shard, offsets_local, coeffs[segment_group], out)
    return IntegrationResult(out, group_stats, coeffs, cases, group_stats)


def _runs(segment_group: torch.Tensor, num_groups: int) -> torch.Tensor | None:
    """The fused op's ``groups`` (int64 [G+1], CPU) when every group is a run of consecutive
    segments in group order (segment_group non-decreasing), else None."""
    host = segment_group.cpu()
    if host.numel() > 1 and bool((host[1:] < host[:-1]).any()):
        return None
    counts = torch.bincount(host, minlength=num_groups)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _check_segment_group(segment_group, num_segments: int, active, device) -> torch.Tensor:
    if not isinstance(segment_group, torch.Tensor) or segment_group.dim() != 1 or segment_group.dtype != torch.int64:
        raise ValueError("segment_group: expected a 1-d int64 tensor (group of every segment)")
    if segment_group.numel() != num_segments:
        raise ValueError(f"segment_group: expected {num_segments} entries (one per segment), got {segment_group.numel()}")
    if segment_group.numel() and int(segment_group.min()) < 0:
        raise ValueError("segment_group: group indices must be >= 0")
    if active is not None and segment_group.numel() and int(segment_group.max()) >= active.numel():
        raise ValueError(f"segment_group: group index {int(segment_group.max())} out of range for {active.numel()} groups (active)")
    return segment_group.to(device)

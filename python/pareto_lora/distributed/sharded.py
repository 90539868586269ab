"""Integration of sharded flat buffers: each rank holds a disjoint slice of both objectives.

The statistics are sums, so each rank computes them on its shards, one all-reduce of the small
per-group table makes them global, and the rule and the combine run locally; zero padding adds
nothing. (:class:`pareto_lora.distributed.fsdp.FSDPSync` applies the same idea to FSDP2 models.)
May import: :mod:`pareto_lora.flat`, :mod:`pareto_lora.ops`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ops
from ..flat import sum_into_groups
from ..result import IntegrationResult
from ..rules import RuleSpec, as_spec

__all__ = ["sharded_integrate"]


def sharded_integrate(
    a_shard: torch.Tensor,
    b_shard: torch.Tensor,
    offsets_local: torch.Tensor,
    out: torch.Tensor | None = None,
    rule: str | RuleSpec = "pareto_lora",
    tau: float | None = None,
    active: torch.Tensor | None = None,
    gamma: float | None = None,
    symmetric: bool | None = None,
    segment_group: torch.Tensor | None = None,
    group=None,
    backend: str = "auto",
) -> IntegrationResult:
    """:func:`pareto_lora.integrate` on one rank's shards of two flat gradient buffers.

    ``offsets_local`` marks this rank's part of every segment (an empty segment where the rank
    holds none of it) and must cover the whole shard: zero padding may sit in any segment,
    as zeros add nothing to the statistics. ``segment_group`` (int64 [S], optional) maps segments to groups, so a
    group may be several segments (e.g. one per parameter shard); without it every segment is
    its own group. The per-group statistics are all-reduced (sum) over the process group
    ``group`` -- the only communication -- and the returned ``stats`` are the global ones;
    ``out`` (default: a new tensor) receives this rank's shard of the integrated gradient.
    """
    spec = as_spec(rule, tau, gamma, symmetric)
    if not isinstance(a_shard, torch.Tensor) or not isinstance(b_shard, torch.Tensor):
        raise ValueError("a_shard, b_shard: expected tensors (this rank's shards of the two gradients)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sharded_integrate: torch.distributed is not initialised (call init_process_group first)")
    if out is None:
        out = torch.empty_like(a_shard)
    stats = ops.segment_stats(a_shard, b_shard, offsets_local, backend=backend)
    if segment_group is not None:
        segment_group = _check_segment_group(segment_group, stats.shape[0], active, stats.device)
        if active is not None:
            num_groups = active.numel()
        else:
            num_groups = int(segment_group.max()) + 1 if segment_group.numel() else 0
        stats = sum_into_groups(stats, segment_group, num_groups)
    dist.all_reduce(stats, group=group)
    coeffs, cases = ops.rule_coefficients(stats, spec, active=active, backend=backend)
    seg_coeffs = coeffs if segment_group is None else coeffs[segment_group]
    ops.combine(a_shard, b_shard, offsets_local, seg_coeffs, out=out, backend=backend)
    return IntegrationResult(out=out, stats=stats, coeffs=coeffs, cases=cases)


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

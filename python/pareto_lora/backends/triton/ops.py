"""Triton backend of the integration op (``backend="triton"``).

The :class:`~pareto_lora.backends.protocol.Backend` functions with the semantics of the other
backends (csrc/cpu/ops_cpu.cpp): stats float64 [S, 3], coeffs float32 [G, 2], cases int32 [G];
``integrate`` with groups / poison / given stats runs the ``integrate_step`` op. The module-level functions
validate every argument with :mod:`pareto_lora.checks` (same messages as C++), build the tile
table on the host and only then call the ``torch.ops.pareto_lora_triton.*`` ops, which launch
the kernels of :mod:`pareto_lora.backends.triton.kernels` and never read tensor values on the host.

The ops are registered with :func:`torch.library.triton_op`, so torch.compile traces into them
and sees the kernels. The offset checks and the tile table need the offsets' values, so they
stay outside the ops: a compiled region should call the ops with a table from
:func:`tile_table` built outside it::

    tiles, seg_tiles = tile_table(offsets, a.device)            # eager, cached per layout
    params = rule_params(pareto_lora.RuleSpec(), a.device)       # eager, cached per value
    step = torch.compile(lambda a, b, out: torch.ops.pareto_lora_triton.integrate(
        a, b, tiles, seg_tiles, out, "pareto_lora", False, params, None), fullgraph=True)

Without a GPU, Triton's interpreter runs the same kernels on CPU tensors when
``TRITON_INTERPRET=1`` is set before triton is first imported.
"""

from typing import Optional

import torch
import triton  # noqa: F401  (ImportError here tells pareto_lora.ops that the backend is absent)
from torch.library import triton_op, wrap_triton

from ... import checks as _checks
from ...result import IntegrationResult
from ...rules import RULE_IDS, RuleSpec
from ..protocol import DEFAULT_RULE
from . import kernels as K
# re-exported: the module's public surface (tile_table, rule_params, ...) and its tests' names
from .launch import (  # noqa: F401
    _KERNELS_INTERPRETED,
    BLOCK,
    LANES,
    NUM_WARPS,
    RULE_SEGS,
    SEGS,
    _build_tile_table,
    _check_device,
    group_table,
    is_available,
    rule_params,
    tile_table,
)

__all__ = ["is_available", "tile_table", "segment_stats", "rule_coefficients", "combine", "integrate", "gram",
           "combine_many"]


# ---- ops (no validation, no host reads: traceable by torch.compile) ----------------------------
def _rule_launch_args(rule: str, symmetric: bool, params: Optional[torch.Tensor], active: Optional[torch.Tensor],
                      device):
    """Kernel arguments shared by the kernels that apply the rule (the op's unpacked RuleSpec)."""
    has_active = active is not None
    # Unused pointers are passed as None (a constexpr to Triton) rather than as a stand-in
    # tensor, so no buffer is handed to a kernel twice (torch.compile's mutation analysis).
    # The kernels read one byte per segment at unit stride: a strided mask is made contiguous.
    act = active.to(device).contiguous().view(torch.uint8) if has_active else None
    return (
        {"params_ptr": params},
        act,
        dict(HAS_ACTIVE=has_active, RULE=RULE_IDS[rule], SYMMETRIC=bool(symmetric)),
    )


_NO_RULE = ({"params_ptr": None}, None, dict(HAS_ACTIVE=False, RULE=RULE_IDS["sum"], SYMMETRIC=False))


def _tile_partials(a: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    num_tiles = tiles.shape[1]
    partial = torch.empty((3, num_tiles), dtype=torch.float64, device=a.device)
    if num_tiles > 0:
        wrap_triton(K.tile_stats_kernel)[(num_tiles,)](
            a, b, tiles, partial, num_tiles, BLOCK=BLOCK, F64=a.dtype == torch.float64, num_warps=NUM_WARPS
        )
    return partial


def _reduce(partial, seg_tiles, stats, coeffs, cases, rule_args, apply_rule: bool) -> None:
    num_segments = stats.shape[0]
    if num_segments == 0:
        return
    scalars, act, flags = rule_args
    wrap_triton(K.segment_reduce_kernel)[(triton.cdiv(num_segments, SEGS),)](
        partial, seg_tiles, stats, partial.shape[1], num_segments, act, coeffs, cases,
        SEGS=SEGS, LANES=LANES, APPLY_RULE=apply_rule, **scalars, **flags,
    )


def _combine_tiles(a, b, tiles, coeffs, out) -> None:
    num_tiles = tiles.shape[1]
    if num_tiles > 0:
        wrap_triton(K.combine_kernel)[(num_tiles,)](
            a, b, out, tiles, coeffs, num_tiles, BLOCK=BLOCK, F64=a.dtype == torch.float64, num_warps=NUM_WARPS
        )


@triton_op("pareto_lora_triton::segment_stats", mutates_args=())
def _segment_stats_op(a: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor, seg_tiles: torch.Tensor) -> torch.Tensor:
    num_segments = seg_tiles.shape[0] - 1
    stats = torch.empty((num_segments, 3), dtype=torch.float64, device=a.device)
    partial = _tile_partials(a, b, tiles)
    _reduce(partial, seg_tiles, stats, None, None, _NO_RULE, apply_rule=False)
    return stats


@triton_op("pareto_lora_triton::rule_coefficients", mutates_args=())
def _rule_coefficients_op(
    stats: torch.Tensor, rule: str, symmetric: bool, params: torch.Tensor, active: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    num_segments = stats.shape[0]
    stats = stats.contiguous()
    coeffs = torch.empty((num_segments, 2), dtype=torch.float32, device=stats.device)
    cases = torch.empty((num_segments,), dtype=torch.int32, device=stats.device)
    if num_segments > 0:
        scalars, act, flags = _rule_launch_args(rule, symmetric, params, active, stats.device)
        wrap_triton(K.rule_kernel)[(triton.cdiv(num_segments, RULE_SEGS),)](
            stats, num_segments, act, coeffs, cases, SEGS=RULE_SEGS, **scalars, **flags
        )
    return coeffs, cases


@triton_op("pareto_lora_triton::combine", mutates_args={"out"})
def _combine_op(
    a: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor, coeffs: torch.Tensor, out: torch.Tensor
) -> None:
    _combine_tiles(a, b, tiles, coeffs.contiguous(), out)


@triton_op("pareto_lora_triton::integrate_step", mutates_args={"out"})
def _integrate_step_op(
    a: torch.Tensor,
    b: torch.Tensor,
    tiles: torch.Tensor,
    seg_tiles: torch.Tensor,
    group_tiles: torch.Tensor,
    groups: torch.Tensor,
    out: torch.Tensor,
    rule: str,
    symmetric: bool,
    params: torch.Tensor,
    active: Optional[torch.Tensor],
    poison: Optional[torch.Tensor],
    stats: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouped training step: statistics per segment (or the given ones), the group sums and
    rules in one launch, the combine with each tile's group coefficients (three or four launches)."""
    num_segments, num_groups = seg_tiles.shape[0] - 1, groups.shape[0] - 1
    if stats is None:
        seg_stats = torch.empty((num_segments, 3), dtype=torch.float64, device=a.device)
        _reduce(_tile_partials(a, b, tiles), seg_tiles, seg_stats, None, None, _NO_RULE, apply_rule=False)
    else:
        seg_stats = stats.contiguous().clone()
    group_stats = torch.empty((num_groups, 3), dtype=torch.float64, device=a.device)
    coeffs = torch.empty((num_groups, 2), dtype=torch.float32, device=a.device)
    cases = torch.empty((num_groups,), dtype=torch.int32, device=a.device)
    psn = None if poison is None else poison.view(torch.uint8)
    if num_groups > 0:
        scalars, act, flags = _rule_launch_args(rule, symmetric, params, active, a.device)
        wrap_triton(K.group_rule_kernel)[(triton.cdiv(num_groups, RULE_SEGS),)](
            seg_stats, groups, num_groups, group_stats, psn, act, coeffs, cases,
            SEGS=RULE_SEGS, HAS_POISON=poison is not None, **scalars, **flags,
        )
    num_tiles = group_tiles.shape[1]
    if num_tiles > 0:
        wrap_triton(K.combine_kernel)[(num_tiles,)](
            a, b, out, group_tiles, coeffs, num_tiles, BLOCK=BLOCK, F64=a.dtype == torch.float64,
            poison_ptr=psn, HAS_POISON=poison is not None, num_warps=NUM_WARPS,
        )
    return seg_stats, group_stats, coeffs, cases


@triton_op("pareto_lora_triton::integrate", mutates_args={"out"})
def _integrate_op(
    a: torch.Tensor,
    b: torch.Tensor,
    tiles: torch.Tensor,
    seg_tiles: torch.Tensor,
    out: torch.Tensor,
    rule: str,
    symmetric: bool,
    params: torch.Tensor,
    active: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_segments = seg_tiles.shape[0] - 1
    stats = torch.empty((num_segments, 3), dtype=torch.float64, device=a.device)
    coeffs = torch.empty((num_segments, 2), dtype=torch.float32, device=a.device)
    cases = torch.empty((num_segments,), dtype=torch.int32, device=a.device)
    partial = _tile_partials(a, b, tiles)
    rule_args = _rule_launch_args(rule, symmetric, params, active, a.device)
    _reduce(partial, seg_tiles, stats, coeffs, cases, rule_args, apply_rule=True)
    _combine_tiles(a, b, tiles, coeffs, out)
    return stats, coeffs, cases


# ---- validated entry points (the registry's functions for backend="triton") ---------------------
def segment_stats(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[G, 3] float64 per-segment ||a||^2, ||b||^2, a.b."""
    offsets = _checks.as_offsets(offsets)
    _checks.check_buffers(a, b)
    _checks.check_offsets(offsets, a.numel(), a.device)
    _check_device(a.device)
    tiles, seg_tiles = tile_table(offsets, a.device)
    return torch.ops.pareto_lora_triton.segment_stats(a, b, tiles, seg_tiles)


def rule_coefficients(
    stats: torch.Tensor, spec: RuleSpec = DEFAULT_RULE, *, active: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coeffs [G, 2] float32, cases [G] int32) of `spec` on stats of any source."""
    active = _checks.as_active(active)
    _checks.check_rule_args(stats, active)
    _check_device(stats.device)
    return torch.ops.pareto_lora_triton.rule_coefficients(stats, *_op_rule_args(spec, active, stats.device))


def combine(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, coeffs: torch.Tensor, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """out_s = alpha_s * a_s + beta_s * b_s; `out` may be `a` or `b` (a new tensor when None)."""
    offsets = _checks.as_offsets(offsets)
    _checks.check_combine(a, b, offsets, coeffs, out)
    _check_device(a.device)
    out = torch.empty_like(a) if out is None else out
    tiles, _ = tile_table(offsets, a.device)
    torch.ops.pareto_lora_triton.combine(a, b, tiles, coeffs, out)
    return out


def integrate(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    spec: RuleSpec = DEFAULT_RULE,
    *,
    active: Optional[torch.Tensor] = None,
    groups: Optional[torch.Tensor] = None,
    poison: Optional[torch.Tensor] = None,
    stats: Optional[torch.Tensor] = None,
) -> IntegrationResult:
    """stats -> rule -> combine on the device (three launches, four with groups / poison; no host
    sync: poison is read by the kernels)."""
    offsets, active, groups = _checks.as_offsets(offsets), _checks.as_active(active), _checks.as_groups(groups)
    _checks.check_integrate(a, b, offsets, out, active, groups, poison, stats)
    _check_device(a.device)
    out = torch.empty_like(a) if out is None else out
    tiles, seg_tiles = tile_table(offsets, a.device)
    if groups is not None or poison is not None or stats is not None:
        group_tiles, dev_groups = group_table(offsets, groups, a.device)
        seg_stats, group_stats, coeffs, cases = torch.ops.pareto_lora_triton.integrate_step(
            a, b, tiles, seg_tiles, group_tiles, dev_groups, out, *_op_rule_args(spec, active, a.device), poison, stats
        )
        return IntegrationResult(out, seg_stats, coeffs, cases, group_stats)
    seg_stats, coeffs, cases = torch.ops.pareto_lora_triton.integrate(
        a, b, tiles, seg_tiles, out, *_op_rule_args(spec, active, a.device)
    )
    return IntegrationResult(out, seg_stats, coeffs, cases, seg_stats.clone())


def _op_rule_args(spec: RuleSpec, active, device):
    """A RuleSpec as the ops' arguments: its name, ``symmetric`` (a compile-time flag of the
    kernels) and its parameters as a cached device tensor (:func:`rule_params`)."""
    return spec.name, spec.symmetric, rule_params(spec, device), active


# The K-objective pair, defined beside its kernels (multi.py imports this module's tile table,
# hence the import at the end): the registry finds every backend function here.
from .multi import combine_many, gram  # noqa: E402

"""Argument validation of the K-objective ops (gram, combine_many, integrate_many).

The same messages as the two-objective checks (:mod:`pareto_lora.checks`), with each gradient named
by its place: ``grads[k]``. Every check runs before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import checks as _checks
from .gram import MAX_OBJECTIVES, num_pairs

__all__ = ["check_grads", "check_weights", "check_combine_many", "check_integrate_many"]


def check_grads(grads) -> tuple[torch.Tensor, ...]:
    """2 <= K <= MAX_OBJECTIVES contiguous floating buffers of one dtype, numel and device; a tuple."""
    if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence) or isinstance(grads, (str, bytes)):
        raise ValueError(f"grads: expected a list or tuple of 2 to {MAX_OBJECTIVES} tensors, got {type(grads).__name__}")
    grads = tuple(grads)
    if not 2 <= len(grads) <= MAX_OBJECTIVES:
        raise ValueError(f"grads: expected 2 to {MAX_OBJECTIVES} tensors (one per objective), got {len(grads)}")
    first = grads[0]
    for k, g in enumerate(grads):
        name = f"grads[{k}]"
        _checks._tensor(name, g)
        if g.dtype not in _checks.FLOAT_DTYPES:
            _checks._fail(name, f"expected dtype float32, bfloat16, float16 or float64, got {_checks.dtype_name(g.dtype)}")
        if not g.is_contiguous():
            _checks._fail(name, "expected a contiguous tensor (flat gradient buffer)")
        if k == 0:
            continue
        if g.numel() != first.numel():
            _checks._fail(name, f"expected numel {first.numel()} (same as grads[0]), got {g.numel()}")
        if g.dtype != first.dtype:
            _checks._fail(name, f"expected dtype {_checks.dtype_name(first.dtype)} (same as grads[0]), "
                                f"got {_checks.dtype_name(g.dtype)}")
        _checks._on(name, g, first.device, host_ok=False, what=" (same as grads[0])")
    return grads


def check_weights(coeffs, num_segments: int, k: int, device: torch.device, name: str = "coeffs") -> None:
    """float32 or float64 [S, K] on the gradients' device."""
    _checks._tensor(name, coeffs)
    if coeffs.dtype not in (torch.float32, torch.float64):
        _checks._fail(name, f"expected dtype float32 or float64, got {_checks.dtype_name(coeffs.dtype)}")
    if tuple(coeffs.shape) != (num_segments, k):
        _checks._fail(name, f"expected shape [{num_segments}, {k}] (one weight per segment and objective), "
                            f"got {tuple(coeffs.shape)}")
    _checks._on(name, coeffs, device, host_ok=False, what=" (same as grads[0])")


def _check_out(out, grads) -> None:
    # checks.check_out's overlap names a and b; here any grads[k] may be out (in place), nothing in between.
    _checks.check_out_like(out, grads[0], "grads[0]")
    if out.numel() == 0:
        return
    lo, hi = _checks._byte_range(out)
    for k, g in enumerate(grads):
        g_lo, g_hi = _checks._byte_range(g)
        if (g_lo, g_hi) != (lo, hi) and g_lo < hi and lo < g_hi:
            _checks._fail("out", f"expected one of grads or memory disjoint from all; it partially overlaps grads[{k}]")


def check_combine_many(grads, offsets, coeffs, out) -> tuple[tuple[torch.Tensor, ...], int]:
    """All checks of combine_many (``out`` may be None); returns (grads as a tuple, S)."""
    grads = check_grads(grads)
    s = _checks.check_offsets(offsets, grads[0].numel(), grads[0].device)
    check_weights(coeffs, s, len(grads), grads[0].device)
    if out is not None:
        _check_out(out, grads)
    return grads, s


def check_integrate_many(grads, offsets, out, active, groups=None, poison=None, stats=None):
    """All tensor checks of integrate_many; returns (grads, S, groups on the CPU or None)."""
    grads = check_grads(grads)
    device = grads[0].device
    s = _checks.check_offsets(offsets, grads[0].numel(), device)
    if out is not None:
        _check_out(out, grads)
    host_groups = _checks.check_step_args(s, device, active, groups, poison, stats, num_pairs(len(grads)),
                                          "one row of K(K+1)/2 per segment", "grads[0]")
    return grads, s, host_groups

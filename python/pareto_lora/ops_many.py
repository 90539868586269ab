"""The K-objective op: per-segment Gram -> weighting per group -> combine, over K flat buffers.

``integrate_many(grads, offsets, rule=...)`` is to K objectives what :func:`pareto_lora.integrate`
is to two: one statistics pass (the backend's ``gram``), the weighting per group on the device
(:mod:`pareto_lora.multi.weightings`, batched over groups, float64), and one combine pass (the
backend's ``combine_many``). Between the two passes the weighting runs as ordinary torch ops on
the Gram: no host round trip. The two-objective op stays as it is, one fused launch.
"""

from __future__ import annotations

import math

import torch

from . import checks as _checks
from .backends import resolve_backend
from .multi import gram_matrix
from .multi.checks import check_integrate_many
from .multi.weightings import check_rule, is_user_weighting, weigh
from .reference import group_sums, segment_groups
from .result import MultiResult
from .rules import Case, RuleSpec, as_spec

__all__ = ["gram", "combine_many", "integrate_many"]


def _device_of(grads) -> torch.device:
    first = grads[0] if isinstance(grads, (list, tuple)) and grads else None
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def gram(grads, offsets, backend: str = "auto") -> torch.Tensor:
    """[S, K(K+1)/2] float64 per-segment g_i . g_j of K flat buffers (order: pareto_lora.multi.pairs)."""
    return resolve_backend(backend, _device_of(grads)).gram(grads, offsets)


def combine_many(grads, offsets, coeffs: torch.Tensor, out: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """out_s = sum_k coeffs[s, k] * grads[k]_s; returns out (a new tensor when out is None)."""
    return resolve_backend(backend, _device_of(grads)).combine_many(grads, offsets, coeffs, out)


def integrate_many(
    grads,
    offsets,
    rule="mean",
    *,
    out: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    poison: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    backend: str = "auto",
    **params,
) -> MultiResult:
    """Gram -> weighting -> combine over the segments of K flat gradient buffers of one layout.

    ``grads``: 2 to 8 contiguous buffers (one per objective, same dtype, numel and device);
    ``offsets`` (int64, S+1) marks the segments; ``rule``: a K-objective rule name
    (:data:`pareto_lora.multi.weightings.K_RULES`) with its parameters as keywords
    (``weights=(...)`` for ``constant``), a :class:`~pareto_lora.RuleSpec`, or a user-defined
    weighting: a callable from the batched Gram [G, K, K] (float64) to weights [G, K], or a torchjd
    ``Weighting`` (:mod:`pareto_lora.multi.weightings.user`; it runs in Python between the two passes). ``out`` may be one of
    ``grads`` (in place) or None (a new tensor). ``groups``, ``active``, ``poison`` and ``stats``
    ([S, K(K+1)/2] float64, e.g. all-reduced) are those of :func:`pareto_lora.integrate`.
    """
    if is_user_weighting(rule) and not isinstance(rule, RuleSpec):
        if params:
            raise ValueError(f"{next(iter(params))}: expected no rule parameters with a user-defined weighting")
        spec = rule
    else:
        spec = as_spec(rule, **params)
    offsets, active, groups = _checks.as_offsets(offsets), _checks.as_active(active), _checks.as_groups(groups)
    grads, num_segments, host_groups = check_integrate_many(grads, offsets, out, active, groups, poison, stats)
    k = len(grads)
    impl = resolve_backend(backend, grads[0].device)
    check_rule(spec, k)  # before any pass runs: a bad rule leaves `out` as it was
    stats = impl.gram(grads, offsets) if stats is None else stats.to(torch.float64, copy=True)
    group_stats = stats + 0.0 if host_groups is None else group_sums(stats, host_groups)
    dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    weights, cases = weigh(spec, gram_matrix(group_stats, k), active, dtype)
    seg_weights = weights if host_groups is None else \
        weights[segment_groups(host_groups, num_segments).to(weights.device)]
    if poison is not None:
        seg_weights = seg_weights * torch.where(poison, math.nan, 1.0).to(seg_weights.dtype)
        cases = torch.where(poison, torch.full_like(cases, int(Case.NONFINITE)), cases)
    out = impl.combine_many(grads, offsets, seg_weights.contiguous(), out)
    return MultiResult(out, stats, group_stats, weights, cases)

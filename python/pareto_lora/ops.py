"""The public functions of the integration op: defaults, backend choice, one RuleSpec.

``integrate`` (stats -> rule -> combine, fused) and its three stages ``segment_stats``,
``rule_coefficients`` and ``combine``. Each resolves its backend through the registry
(:mod:`pareto_lora.backends`) and returns what every backend returns. ``rule`` is a rule name
with loose ``tau``/``gamma``/``symmetric``/``margin``, or one :class:`pareto_lora.RuleSpec`:
these functions are the public boundary. They are written with the spec; the decorator
:func:`pareto_lora.rules.rule_keywords` adds the loose keywords (one per RuleSpec field) to their
signatures and makes them one RuleSpec, once. Below it every backend, the oracle included, takes
the spec (:class:`pareto_lora.backends.protocol.Backend`).
"""

from __future__ import annotations

import torch

from .backends import BACKENDS, available_backends, resolve_backend
from .result import IntegrationResult, stats_metrics
from .rules import DEFAULT_RULE, RuleSpec, rule_keywords

__all__ = [
    "IntegrationResult",
    "integrate",
    "segment_stats",
    "rule_coefficients",
    "combine",
    "available_backends",
    "resolve_backend",
    "stats_metrics",
    "BACKENDS",
]


def _device_of(t) -> torch.device:
    # A non-tensor argument reaches the backend, whose own check names it.
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


@rule_keywords
def integrate(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    rule: RuleSpec = DEFAULT_RULE,
    active: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    groups: torch.Tensor | None = None,
    poison: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
) -> IntegrationResult:
    """Fused stats -> rule -> combine over the segments of two flat gradient buffers.

    ``a`` is the text gradient, ``b`` the image gradient; ``offsets`` (int64, S+1) marks the
    segments. ``out`` may be ``a`` or ``b`` (in place) or None (a new tensor). ``tau``,
    ``gamma``, ``symmetric``, ``margin`` default to 0.5, 1.0, False, 0.0 (or come from a ``RuleSpec``
    ``rule``); ``margin`` > 0 makes the conflict test ``cos < -margin`` (rules.RuleSpec).

    A training step in one call: ``groups`` (int64 [G+1], a list too) makes the rule run per group
    of consecutive segments on their statistics summed in float64 left to right (``active`` is
    then [G]; an empty group gets zero statistics); ``poison`` (0-d bool tensor on a's device)
    makes the whole output NaN and every case NONFINITE without a host sync; ``stats`` ([S, 3]
    float64, e.g. all-reduced across ranks) replaces the statistics pass. The result's ``stats``
    are per segment, ``group_stats``, ``coeffs`` and ``cases`` per group.
    """
    impl = resolve_backend(backend, _device_of(a))
    return impl.integrate(a, b, offsets, out, rule, active=active, groups=groups, poison=poison, stats=stats)


def segment_stats(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[S, 3] float64 per-segment ||a||^2, ||b||^2, a.b."""
    return resolve_backend(backend, _device_of(a)).segment_stats(a, b, offsets)


@rule_keywords
def rule_coefficients(
    stats: torch.Tensor,
    rule: RuleSpec = DEFAULT_RULE,
    active: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coeffs [G, 2] float32, cases [G] int32) from per-segment stats of any source."""
    impl = resolve_backend(backend, _device_of(stats))
    return impl.rule_coefficients(stats, rule, active=active)


def combine(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    coeffs: torch.Tensor,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """out_s = alpha_s * a_s + beta_s * b_s; returns out (a new tensor when out is None)."""
    return resolve_backend(backend, _device_of(a)).combine(a, b, offsets, coeffs, out)

"""The :class:`Backend` protocol: the functions every backend module implements, with their types.

A backend is a module (``backends.cpp``, ``backends.triton.ops``, ``pareto_lora.reference``),
not an object: the protocol only states what the registry may call. The rule arrives as one
:class:`~pareto_lora.rules.RuleSpec` (positional); everything after it is keyword-only, so a
parameter added to the rule never shifts a backend's arguments.

Grouped calls (``integrate`` with ``groups``): group g is segments ``groups[g] .. groups[g+1]-1``;
its statistics are its segments' rows summed in float64 left to right from +0.0 (an empty group
gets zeros: the rule's DEGENERATE case, and it has no elements to combine); the rule runs per
group (``active`` is then [G]) and each segment is combined with its group's coefficients.
``poison`` (0-d bool on a's device, read there) makes the combine's coefficients NaN and every
case NONFINITE, while ``coeffs`` stay the rule's own. ``stats`` ([S, 3] float64) replaces the
statistics pass.

K objectives (``ops_many.integrate_many``): ``gram`` returns [S, K(K+1)/2] float64 rows in the
column order of :func:`pareto_lora.multi.pairs` (exact products summed in float64),
``combine_many`` writes out_s = sum_k coeffs[s, k] grads[k]_s computed as ``combine`` computes
for each dtype; ``out`` may be one of ``grads`` exactly.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..result import IntegrationResult
from ..rules import DEFAULT_RULE, RuleSpec

__all__ = ["Backend", "DEFAULT_RULE"]  # DEFAULT_RULE: rules.DEFAULT_RULE, the rule applied when none is given


@runtime_checkable
class Backend(Protocol):
    """The registry's view of a backend module (see the module docstring for the semantics)."""

    def is_available(self, device_type: str) -> bool:
        """Whether the backend has kernels for tensors of `device_type`."""

    def segment_stats(self, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[S, 3] float64 per-segment ||a||^2, ||b||^2, a.b."""

    def rule_coefficients(
        self, stats: torch.Tensor, spec: RuleSpec = DEFAULT_RULE, /, *, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(coeffs [G, 2] float32, cases [G] int32) of `spec` on statistics of any source."""

    def combine(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        offsets: torch.Tensor,
        coeffs: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out_s = alpha_s a_s + beta_s b_s; returns out (a new tensor when None)."""

    def integrate(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        offsets: torch.Tensor,
        out: torch.Tensor | None = None,
        spec: RuleSpec = DEFAULT_RULE,
        /,
        *,
        active: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        poison: torch.Tensor | None = None,
        stats: torch.Tensor | None = None,
    ) -> IntegrationResult:
        """Fused statistics -> rule (per group) -> combine."""

    def gram(self, grads, offsets: torch.Tensor) -> torch.Tensor:
        """[S, K(K+1)/2] float64 per-segment g_i . g_j of K = len(grads) buffers (2 <= K <= 8)."""

    def combine_many(
        self, grads, offsets: torch.Tensor, coeffs: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """out_s = sum_k coeffs[s, k] grads[k]_s (coeffs [S, K]); returns out (a new tensor when None)."""

"""The compiled backend: loads ``pareto_lora._C`` (which registers ``torch.ops.pareto_lora.*``,
schemas in csrc/ops.cpp), registers their fake kernels, and calls them with the op signatures.

Implements :class:`~pareto_lora.backends.protocol.Backend`; this is the one place where a
:class:`RuleSpec` is unpacked into the compiled ops' scalar arguments (the dispatcher's schemas
take scalars). The ops validate their tensor arguments in C++ (csrc/validate.h).
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the shared library: registers torch.ops.pareto_lora.*)
from .. import checks
from ..multi import checks as multi_checks
from ..multi.gram import num_pairs
from ..result import IntegrationResult
from ..rules import RuleSpec
from .protocol import DEFAULT_RULE

__all__ = ["is_available", "segment_stats", "rule_coefficients", "combine", "integrate", "gram", "combine_many"]


# ---- fake (meta) kernels: shapes and dtypes only, for torch.compile / FakeTensor -------------
def _num_segments(offsets: torch.Tensor) -> int:
    return offsets.shape[0] - 1


@torch.library.register_fake("pareto_lora::segment_stats")
def _segment_stats_fake(a, b, offsets):
    return a.new_empty((_num_segments(offsets), 3), dtype=torch.float64)


@torch.library.register_fake("pareto_lora::rule_coefficients")
def _rule_coefficients_fake(stats, rule, params, active=None):
    g = stats.shape[0]
    return stats.new_empty((g, 2), dtype=torch.float32), stats.new_empty((g,), dtype=torch.int32)


@torch.library.register_fake("pareto_lora::combine")
def _combine_fake(a, b, offsets, coeffs, out):
    return None


@torch.library.register_fake("pareto_lora::integrate")
def _integrate_fake(a, b, offsets, out, rule, params, active=None, groups=None, poison=None, stats=None):
    s = _num_segments(offsets)
    g = s if groups is None else groups.shape[0] - 1
    return (
        a.new_empty((s, 3), dtype=torch.float64),
        a.new_empty((g, 3), dtype=torch.float64),
        a.new_empty((g, 2), dtype=torch.float32),
        a.new_empty((g,), dtype=torch.int32),
    )


@torch.library.register_fake("pareto_lora::gram")
def _gram_fake(grads, offsets):
    return grads[0].new_empty((_num_segments(offsets), num_pairs(len(grads))), dtype=torch.float64)


@torch.library.register_fake("pareto_lora::combine_many")
def _combine_many_fake(grads, offsets, coeffs, out):
    return None


# ---- the kernel probe ---------------------------------------------------------------------------
def is_available(device_type: str) -> bool:
    """Whether the extension has kernels for `device_type` ("cuda" also covers ROCm builds)."""
    if device_type == "cpu":
        return True
    return device_type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key("pareto_lora::integrate", "CUDA")


# ---- the op signatures ------------------------------------------------------------------------
# The ops check tensors in C++; these Python pre-checks turn what the dispatcher would reject
# with a generic RuntimeError (a list, None, a meta tensor) into the same ValueError as elsewhere.
def segment_stats(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    offsets = checks.as_offsets(offsets)
    checks.check_types(a=a, b=b, offsets=offsets)
    return torch.ops.pareto_lora.segment_stats(a, b, offsets)


def rule_coefficients(
    stats: torch.Tensor, spec: RuleSpec = DEFAULT_RULE, *, active: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    active = checks.as_active(active)
    checks.check_types(stats=stats, active=active)
    return torch.ops.pareto_lora.rule_coefficients(stats, *_rule_args(spec, active))


def combine(a, b, offsets, coeffs, out: torch.Tensor | None = None) -> torch.Tensor:
    offsets = checks.as_offsets(offsets)
    checks.check_types(a=a, b=b, offsets=offsets, coeffs=coeffs, out=out)
    out = torch.empty_like(a) if out is None else out
    torch.ops.pareto_lora.combine(a, b, offsets, coeffs, out)
    return out


def integrate(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    spec: RuleSpec = DEFAULT_RULE,
    *,
    active: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    poison: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
) -> IntegrationResult:
    offsets, active, groups = checks.as_offsets(offsets), checks.as_active(active), checks.as_groups(groups)
    checks.check_types(a=a, b=b, offsets=offsets, out=out, active=active)
    _check_optional(groups, poison, stats)
    out = torch.empty_like(a) if out is None else out
    seg_stats, group_stats, coeffs, cases = torch.ops.pareto_lora.integrate(
        a, b, offsets, out, *_rule_args(spec, active), groups, poison, stats
    )
    return IntegrationResult(out, seg_stats, coeffs, cases, group_stats)


def gram(grads, offsets) -> torch.Tensor:
    """[S, K(K+1)/2] float64 per-segment g_i . g_j (columns: pareto_lora.multi.pairs(K))."""
    offsets = checks.as_offsets(offsets)
    # The Python checks first (the same messages as the op's C++ checks): a list with a non-tensor
    # or a meta tensor would otherwise meet the dispatcher's generic errors.
    grads = multi_checks.check_grads(grads)
    checks.check_offsets(offsets, grads[0].numel(), grads[0].device)
    return torch.ops.pareto_lora.gram(list(grads), offsets)


def combine_many(grads, offsets, coeffs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out_s = sum_k coeffs[s, k] grads[k]_s; `out` may be one of grads (a new tensor when None)."""
    offsets = checks.as_offsets(offsets)
    grads, _ = multi_checks.check_combine_many(grads, offsets, coeffs, out)
    out = torch.empty_like(grads[0]) if out is None else out
    torch.ops.pareto_lora.combine_many(list(grads), offsets, coeffs, out)
    return out


def _check_optional(groups, poison, stats) -> None:
    # What the dispatcher would reject with a generic error (a Python bool, a string, a meta
    # tensor): the same ValueError as on every backend. Tensors' contents are checked in C++.
    cpu = torch.device("cpu")
    if groups is not None and not isinstance(groups, torch.Tensor):
        checks.check_groups(groups, 0, cpu)  # raises: not a tensor
    if poison is not None and not isinstance(poison, torch.Tensor):
        checks.check_poison(poison, cpu)
    if stats is not None and not isinstance(stats, torch.Tensor):
        checks.check_given_stats(stats, 0, cpu)
    checks.check_types(**{k: v for k, v in (("groups", groups), ("poison", poison), ("stats", stats)) if v is not None})


def _rule_args(spec: RuleSpec, active):
    """The one place a RuleSpec becomes the ops' arguments (schemas in csrc/ops.cpp): its name and
    its parameters in the order of rules.KERNEL_PARAMS."""
    return spec.name, list(spec.kernel_params()), active


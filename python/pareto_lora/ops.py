"""Python API of the integration op: backend choice, result object, fake kernels.

The compiled ops are ``torch.ops.pareto_lora.{segment_stats, rule_coefficients, combine,
integrate}`` (schemas in csrc/ops.cpp). The functions here add defaults, allocate ``out``, pick a
backend and wrap the result.

Backends, all with the op signatures:
  "cpp"        the compiled extension (CPU, and CUDA/HIP when built with it)
  "triton"     Triton kernels (python/pareto_lora/triton_ops.py)
  "reference"  pure torch, float64 accumulation (python/pareto_lora/reference.py)
  "auto"       "cpp" when it has a kernel for the tensors' device, else "triton"
"""

from __future__ import annotations

import dataclasses
import importlib
from types import SimpleNamespace

import torch

from . import _C  # noqa: F401  (loads the shared library: registers torch.ops.pareto_lora.*)
from . import reference as _reference
from .rules import Case

__all__ = [
    "IntegrationResult",
    "integrate",
    "segment_stats",
    "rule_coefficients",
    "combine",
    "available_backends",
    "resolve_backend",
    "stats_metrics",
    "sum_into_groups",
]

BACKENDS = ("auto", "cpp", "triton", "reference")


# ---- fake (meta) kernels: shapes and dtypes only, for torch.compile / FakeTensor -------------
def _num_segments(offsets: torch.Tensor) -> int:
    return offsets.shape[0] - 1


@torch.library.register_fake("pareto_lora::segment_stats")
def _segment_stats_fake(a, b, offsets):
    return a.new_empty((_num_segments(offsets), 3), dtype=torch.float32)


@torch.library.register_fake("pareto_lora::rule_coefficients")
def _rule_coefficients_fake(stats, rule="pareto_lora", tau=0.5, active=None, gamma=1.0, symmetric=False):
    g = stats.shape[0]
    return stats.new_empty((g, 2), dtype=torch.float32), stats.new_empty((g,), dtype=torch.int32)


@torch.library.register_fake("pareto_lora::combine")
def _combine_fake(a, b, offsets, coeffs, out):
    return None


@torch.library.register_fake("pareto_lora::integrate")
def _integrate_fake(a, b, offsets, out, rule="pareto_lora", tau=0.5, active=None, gamma=1.0, symmetric=False):
    g = _num_segments(offsets)
    return (
        a.new_empty((g, 3), dtype=torch.float32),
        a.new_empty((g, 2), dtype=torch.float32),
        a.new_empty((g,), dtype=torch.int32),
    )


# ---- backends ---------------------------------------------------------------------------------
def _reference_integrate(a, b, offsets, out, rule, tau, active, gamma, symmetric):
    _, stats, coeffs, cases = _reference.integrate(a, b, offsets, out, rule, tau, active, gamma, symmetric)
    return stats, coeffs, cases


_REFERENCE = SimpleNamespace(
    segment_stats=_reference.segment_stats,
    rule_coefficients=_reference.rule_coefficients,
    combine=_reference.combine,
    integrate=_reference_integrate,
)


def _cpp_has_device(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key("pareto_lora::integrate", "CUDA") and device_type == "cuda"


def _triton_module():
    try:
        return importlib.import_module(".triton_ops", __package__)
    except ImportError as e:  # triton missing or its module not importable here
        raise RuntimeError(f"backend='triton' is not available: {e}") from e


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on tensors of `device`."""
    dev = torch.device(device).type
    names = ["reference"]
    if _cpp_has_device(dev):
        names.insert(0, "cpp")
    try:
        if _triton_module().is_available(dev):
            names.append("triton")
    except RuntimeError:
        pass
    return names


def resolve_backend(backend: str, device: torch.device):
    """Returns the namespace of op-signature functions for `backend` on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "cpp" if _cpp_has_device(device.type) else "triton"
    if backend == "reference":
        return _REFERENCE
    if backend == "triton":
        return _triton_module()
    if not _cpp_has_device(device.type):
        raise RuntimeError(f"backend='cpp': the compiled extension has no kernel for device {device.type!r}")
    return torch.ops.pareto_lora


# ---- result -----------------------------------------------------------------------------------
def stats_metrics(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||a||, ||b||, cos(a, b), ||a||/||b||) per row of [G, 3] statistics, in their dtype.

    cos is 0 where a norm is zero; the ratio is inf where ||b|| = 0 < ||a|| and nan where both are 0.
    """
    na, nb = stats[:, 0].clamp_min(0).sqrt(), stats[:, 1].clamp_min(0).sqrt()
    denom = na * nb
    cos = torch.where(denom > 0, stats[:, 2] / torch.where(denom > 0, denom, 1.0), 0.0)
    return na, nb, cos, na / nb


@dataclasses.dataclass
class IntegrationResult:
    """What :func:`integrate` returns. Tensors stay on the device (no host sync)."""

    out: torch.Tensor  #: the integrated gradient
    stats: torch.Tensor  #: [G, 3] float32: ||a||^2, ||b||^2, a.b
    coeffs: torch.Tensor  #: [G, 2] float32: (alpha, beta), out_s = alpha*a_s + beta*b_s
    cases: torch.Tensor  #: [G] int32 case codes (see :class:`pareto_lora.Case`)

    @property
    def norm_a(self) -> torch.Tensor:
        return stats_metrics(self.stats)[0]

    @property
    def norm_b(self) -> torch.Tensor:
        return stats_metrics(self.stats)[1]

    @property
    def cosine(self) -> torch.Tensor:
        """cos(a, b) per segment; 0 where a norm is zero."""
        return stats_metrics(self.stats)[2]

    @property
    def ratio(self) -> torch.Tensor:
        """||a|| / ||b|| per segment (inf where ||b|| = 0 < ||a||, nan where both are 0)."""
        return stats_metrics(self.stats)[3]

    @property
    def nonfinite(self) -> torch.Tensor:
        """0-d bool tensor: some segment had NaN/Inf statistics (its gradient is not finite)."""
        return (self.cases == int(Case.NONFINITE)).any()


# ---- public functions -------------------------------------------------------------------------
def integrate(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    rule: str = "pareto_lora",
    tau: float = 0.5,
    active: torch.Tensor | None = None,
    gamma: float = 1.0,
    symmetric: bool = False,
    backend: str = "auto",
) -> IntegrationResult:
    """Fused stats -> rule -> combine over the segments of two flat gradient buffers.

    ``a`` is the text gradient, ``b`` the image gradient; ``offsets`` (int64, G+1) marks the
    segments. ``out`` may be ``a`` or ``b`` (in place) or None (a new tensor).
    """
    impl = resolve_backend(backend, a.device if isinstance(a, torch.Tensor) else torch.device("cpu"))
    if out is None:
        out = torch.empty_like(a) if isinstance(a, torch.Tensor) else None
    stats, coeffs, cases = impl.integrate(a, b, offsets, out, rule, float(tau), active, float(gamma), bool(symmetric))
    return IntegrationResult(out=out, stats=stats, coeffs=coeffs, cases=cases)


def segment_stats(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[G, 3] float32 per-segment ||a||^2, ||b||^2, a.b."""
    return resolve_backend(backend, a.device).segment_stats(a, b, offsets)


def rule_coefficients(
    stats: torch.Tensor,
    rule: str = "pareto_lora",
    tau: float = 0.5,
    active: torch.Tensor | None = None,
    gamma: float = 1.0,
    symmetric: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coeffs [G, 2] float32, cases [G] int32) from per-segment stats of any source."""
    impl = resolve_backend(backend, stats.device)
    return impl.rule_coefficients(stats, rule, float(tau), active, float(gamma), bool(symmetric))


def combine(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    coeffs: torch.Tensor,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """out_s = alpha_s * a_s + beta_s * b_s; returns out (a new tensor when out is None)."""
    impl = resolve_backend(backend, a.device)
    if out is None:
        out = torch.empty_like(a)
    impl.combine(a, b, offsets, coeffs, out)
    return out


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

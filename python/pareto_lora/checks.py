"""Argument validation of the tensor arguments for the Python-side backends (reference, Triton).

The compiled ops validate in C++ (csrc/validate.h) with the same messages; both are exercised
by the same parametrised tests. Every check runs before anything is written. The rule's own
parameters are validated once, by :class:`pareto_lora.rules.RuleSpec`.
May import: nothing from the package (tensors in, ValueError out).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _fail(arg: str, msg: str) -> None:
    raise ValueError(f"{arg}: {msg}")


def check_buffers(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            _fail(name, f"expected a Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            _fail(name, f"expected dtype float32, bfloat16, float16 or float64, got {t.dtype}")
        if not t.is_contiguous():
            _fail(name, "expected a contiguous tensor (flat gradient buffer)")
    if b.numel() != a.numel():
        _fail("b", f"expected numel {a.numel()} (same as a), got {b.numel()}")
    if b.dtype != a.dtype:
        _fail("b", f"expected dtype {a.dtype} (same as a), got {b.dtype}")
    if b.device != a.device:
        _fail("b", f"expected device {a.device} (same as a), got {b.device}")


def check_out(out: torch.Tensor, a: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        _fail("out", f"expected a Tensor, got {type(out).__name__}")
    if out.numel() != a.numel():
        _fail("out", f"expected numel {a.numel()} (same as a), got {out.numel()}")
    if out.dtype != a.dtype:
        _fail("out", f"expected dtype {a.dtype} (same as a), got {out.dtype}")
    if out.device != a.device:
        _fail("out", f"expected device {a.device} (same as a), got {out.device}")
    if not out.is_contiguous():
        _fail("out", "expected a contiguous tensor")


def check_offsets(offsets: torch.Tensor, numel: int, device: torch.device) -> int:
    """Validate segment offsets; returns the number of segments G."""
    if not isinstance(offsets, torch.Tensor):
        _fail("offsets", f"expected a Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        _fail("offsets", f"expected dtype int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        _fail("offsets", f"expected a 1-D tensor of length G+1 >= 1, got shape {tuple(offsets.shape)}")
    if offsets.device.type != "cpu" and offsets.device != device:
        _fail("offsets", f"expected device cpu or {device}, got {offsets.device}")
    vals = offsets.cpu()
    if int(vals[0]) != 0:
        _fail("offsets", f"expected offsets[0] == 0, got {int(vals[0])}")
    if int(vals[-1]) != numel:
        _fail("offsets", f"expected offsets[-1] == numel == {numel}, got {int(vals[-1])}")
    if vals.numel() > 1:
        steps = vals[1:] - vals[:-1]
        if bool((steps < 0).any()):
            i = int(torch.nonzero(steps < 0)[0])
            _fail("offsets", f"expected non-decreasing values, but offsets[{i + 1}] < offsets[{i}]")
    return offsets.numel() - 1


def check_stats(stats: torch.Tensor) -> int:
    if not isinstance(stats, torch.Tensor):
        _fail("stats", f"expected a Tensor, got {type(stats).__name__}")
    if stats.dtype not in (torch.float32, torch.float64):
        _fail("stats", f"expected dtype float32 or float64, got {stats.dtype}")
    if stats.dim() != 2 or stats.shape[1] != 3:
        _fail("stats", f"expected shape [G, 3], got {tuple(stats.shape)}")
    return stats.shape[0]


def check_active(active: torch.Tensor | None, num_segments: int) -> None:
    if active is None:
        return
    if not isinstance(active, torch.Tensor):
        _fail("active", f"expected a bool Tensor or None, got {type(active).__name__}")
    if active.dtype != torch.bool:
        _fail("active", f"expected dtype bool, got {active.dtype}")
    if active.dim() != 1 or active.numel() != num_segments:
        _fail("active", f"expected shape [{num_segments}] (one per segment), got {tuple(active.shape)}")


def check_coeffs(coeffs: torch.Tensor, num_segments: int, device: torch.device) -> None:
    if not isinstance(coeffs, torch.Tensor):
        _fail("coeffs", f"expected a Tensor, got {type(coeffs).__name__}")
    if coeffs.dtype not in (torch.float32, torch.float64):
        _fail("coeffs", f"expected dtype float32, got {coeffs.dtype}")
    if tuple(coeffs.shape) != (num_segments, 2):
        _fail("coeffs", f"expected shape [{num_segments}, 2], got {tuple(coeffs.shape)}")
    if coeffs.device != device:
        _fail("coeffs", f"expected device {device} (same as a), got {coeffs.device}")


def check_combine(a, b, offsets, coeffs, out) -> int:
    """All checks of the combine op (``out`` may be None: allocated later); returns G."""
    check_buffers(a, b)
    g = check_offsets(offsets, a.numel(), a.device)
    check_coeffs(coeffs, g, a.device)
    if out is not None:
        check_out(out, a)
    return g


def check_integrate(a, b, offsets, out, active) -> int:
    """All tensor checks of the fused op (``out`` may be None: allocated later); returns G."""
    check_buffers(a, b)
    g = check_offsets(offsets, a.numel(), a.device)
    if out is not None:
        check_out(out, a)
    check_active(active, g)
    return g

"""Argument validation of the tensor arguments, shared by every backend's Python entry point.

The compiled ops validate again in C++ (csrc/validate.h) with the same messages; both are
exercised by the same parametrised tests. Every check runs before anything is written. The
rule's own parameters are validated once, by :class:`pareto_lora.rules.RuleSpec`. Dtypes are
named the same way everywhere ("float32", "int64", never "torch.float32" or "Float").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _fail(arg: str, msg: str) -> None:
    raise ValueError(f"{arg}: {msg}")


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: the spelling every message uses (C++ included)."""
    return str(dtype).removeprefix("torch.")


def _tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, f"expected a Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        # A meta tensor has no data to read or write: only the fake kernels take it.
        _fail(name, "expected a tensor with data, got one on the meta device")


def _on(name: str, t: torch.Tensor, device: torch.device, host_ok: bool, what: str = "") -> None:
    """`t` must live on `device` (or on the CPU when `host_ok`: small tables read by the host)."""
    if t.device == device or (host_ok and t.device.type == "cpu"):
        return
    where = f"cpu or {device}" if host_ok and device.type != "cpu" else str(device)
    _fail(name, f"expected device {where}{what}, got {t.device}")


def as_offsets(offsets):
    """Offsets as given, or a list/tuple of ints made an int64 tensor (a natural way to write them)."""
    if isinstance(offsets, Sequence) and not isinstance(offsets, (str, bytes)):
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            _fail("offsets", "expected an int64 Tensor or a sequence of ints")
        return torch.tensor(list(offsets), dtype=torch.int64)
    return offsets


def as_active(active):
    """Active as given, or a list/tuple of bools made a bool tensor."""
    if isinstance(active, Sequence) and not isinstance(active, (str, bytes)):
        if not all(isinstance(x, bool) for x in active):
            _fail("active", "expected a bool Tensor, a sequence of bools or None")
        return torch.tensor(list(active), dtype=torch.bool)
    return active


def check_buffers(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        _tensor(name, t)
        if t.dtype not in FLOAT_DTYPES:
            _fail(name, f"expected dtype float32, bfloat16, float16 or float64, got {dtype_name(t.dtype)}")
        if not t.is_contiguous():
            _fail(name, "expected a contiguous tensor (flat gradient buffer)")
    if b.numel() != a.numel():
        _fail("b", f"expected numel {a.numel()} (same as a), got {b.numel()}")
    if b.dtype != a.dtype:
        _fail("b", f"expected dtype {dtype_name(a.dtype)} (same as a), got {dtype_name(b.dtype)}")
    _on("b", b, a.device, host_ok=False, what=" (same as a)")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses the (possibly strided) view `t` can touch."""
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    start = t.data_ptr()
    return start + lo * t.element_size(), start + (hi + 1) * t.element_size()


def _check_overlap(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> None:
    """`out` may be `a` or `b` exactly (same memory) or disjoint from both, nothing in between:
    a shifted view would read elements the same call has already overwritten. Decided on address
    ranges, not on storage identity: two storage objects can share memory (two
    ``torch.from_numpy`` views of one NumPy buffer)."""
    if out.numel() == 0:
        return
    lo, hi = _byte_range(out)
    for name, t in (("a", a), ("b", b)):
        if t is None or t.numel() == 0:
            continue
        t_lo, t_hi = _byte_range(t)
        if (t_lo, t_hi) != (lo, hi) and t_lo < hi and lo < t_hi:
            _fail("out", f"expected a, b or memory disjoint from both; it partially overlaps {name}")


def check_out_like(out: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """Everything ``out`` must share with the buffer `ref` (named `ref_name` in the messages): numel,
    dtype, device; contiguous and not requiring grad. Overlap is the caller's (it knows the inputs)."""
    _tensor("out", out)
    if out.numel() != ref.numel():
        _fail("out", f"expected numel {ref.numel()} (same as {ref_name}), got {out.numel()}")
    if out.dtype != ref.dtype:
        _fail("out", f"expected dtype {dtype_name(ref.dtype)} (same as {ref_name}), got {dtype_name(out.dtype)}")
    _on("out", out, ref.device, host_ok=False, what=f" (same as {ref_name})")
    if not out.is_contiguous():
        _fail("out", "expected a contiguous tensor")
    if out.requires_grad:
        # The op writes into out without recording a graph: autograd would silently miss the write.
        _fail("out", "expected a tensor that does not require grad (the op writes into it outside autograd); "
                     "pass out.detach() or a gradient buffer")


def check_out(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
    check_out_like(out, a, "a")
    _check_overlap(out, a, b)


def _boundaries(name: str, t: torch.Tensor, end: int, end_name: str, device: torch.device) -> torch.Tensor:
    """Validate a boundary tensor (offsets into elements, groups into segments): int64 [N+1] on the
    CPU or `device`, t[0] == 0, t[-1] == `end`, non-decreasing. Returns its values on the CPU."""
    _tensor(name, t)
    if t.dtype != torch.int64:
        _fail(name, f"expected dtype int64, got {dtype_name(t.dtype)}")
    if t.dim() != 1 or t.numel() < 1:
        _fail(name, f"expected a 1-D tensor of length G+1 >= 1, got shape {tuple(t.shape)}")
    _on(name, t, device, host_ok=True)
    vals = t.cpu()
    if int(vals[0]) != 0:
        _fail(name, f"expected {name}[0] == 0, got {int(vals[0])}")
    if int(vals[-1]) != end:
        _fail(name, f"expected {name}[-1] == {end_name} == {end}, got {int(vals[-1])}")
    if vals.numel() > 1:
        # Compared, not subtracted: differences of arbitrary int64 values can overflow.
        down = vals[1:] < vals[:-1]
        if bool(down.any()):
            i = int(torch.nonzero(down)[0])
            _fail(name, f"expected non-decreasing values, but {name}[{i + 1}] < {name}[{i}]")
    return vals


def check_offsets(offsets: torch.Tensor, numel: int, device: torch.device) -> int:
    """Validate segment offsets (on the CPU or `device`); returns the number of segments G."""
    _boundaries("offsets", offsets, numel, "numel", device)
    return offsets.numel() - 1


def check_stats(stats: torch.Tensor) -> int:
    _tensor("stats", stats)
    if stats.dtype not in (torch.float32, torch.float64):
        _fail("stats", f"expected dtype float32 or float64, got {dtype_name(stats.dtype)}")
    if stats.dim() != 2 or stats.shape[1] != 3:
        _fail("stats", f"expected shape [G, 3], got {tuple(stats.shape)}")
    return stats.shape[0]


def check_active(active: torch.Tensor | None, num_segments: int, device: torch.device, per: str = "segment") -> None:
    """A bool per segment (per group in a grouped call; any stride), on the CPU or the op's
    `device`; None means all active."""
    if active is None:
        return
    if not isinstance(active, torch.Tensor):
        _fail("active", f"expected a bool Tensor or None, got {type(active).__name__}")
    _tensor("active", active)
    if active.dtype != torch.bool:
        _fail("active", f"expected dtype bool, got {dtype_name(active.dtype)}")
    if active.dim() != 1 or active.numel() != num_segments:
        _fail("active", f"expected shape [{num_segments}] (one per {per}), got {tuple(active.shape)}")
    _on("active", active, device, host_ok=True)


def check_coeffs(coeffs: torch.Tensor, num_segments: int, device: torch.device) -> None:
    _tensor("coeffs", coeffs)
    if coeffs.dtype not in (torch.float32, torch.float64):
        _fail("coeffs", f"expected dtype float32 or float64, got {dtype_name(coeffs.dtype)}")
    if tuple(coeffs.shape) != (num_segments, 2):
        _fail("coeffs", f"expected shape [{num_segments}, 2], got {tuple(coeffs.shape)}")
    _on("coeffs", coeffs, device, host_ok=False, what=" (same as a)")


def check_types(**tensors) -> None:
    """Every named argument is a tensor with data (None allowed for ``out`` and ``active``): what
    the compiled ops need before dispatch, which otherwise fails with a generic RuntimeError."""
    for name, t in tensors.items():
        if t is None and name in ("out", "active"):
            continue
        _tensor(name, t)


def check_rule_args(stats: torch.Tensor, active: torch.Tensor | None) -> int:
    """All tensor checks of the rule op; returns G."""
    g = check_stats(stats)
    check_active(active, g, stats.device)
    return g


def check_combine(a, b, offsets, coeffs, out) -> int:
    """All checks of the combine op (``out`` may be None: allocated later); returns G."""
    check_buffers(a, b)
    g = check_offsets(offsets, a.numel(), a.device)
    check_coeffs(coeffs, g, a.device)
    if out is not None:
        check_out(out, a, b)
    return g


def as_groups(groups):
    """Groups as given, or a list/tuple of ints made an int64 tensor (like offsets)."""
    if isinstance(groups, Sequence) and not isinstance(groups, (str, bytes)):
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
            _fail("groups", "expected an int64 Tensor, a sequence of ints or None")
        return torch.tensor(list(groups), dtype=torch.int64)
    return groups


def check_groups(groups: torch.Tensor, num_segments: int, device: torch.device) -> torch.Tensor:
    """int64 [G+1], groups[0] == 0, groups[-1] == S, non-decreasing; on the CPU or `device`.
    Returns the values on the CPU (the backends cut their work by group on the host)."""
    if not isinstance(groups, torch.Tensor):
        _fail("groups", f"expected an int64 Tensor, a sequence of ints or None, got {type(groups).__name__}")
    return _boundaries("groups", groups, num_segments, "number of segments", device)


def check_poison(poison, device: torch.device) -> None:
    """A 0-d bool tensor on `device` (read there, never on the host), or None."""
    if poison is None:
        return
    if not isinstance(poison, torch.Tensor):
        _fail("poison", f"expected a 0-d bool Tensor or None, got {type(poison).__name__}")
    _tensor("poison", poison)
    if poison.dtype != torch.bool:
        _fail("poison", f"expected dtype bool, got {dtype_name(poison.dtype)}")
    if poison.dim() != 0:
        _fail("poison", f"expected a 0-d tensor, got shape {tuple(poison.shape)}")
    _on("poison", poison, device, host_ok=False, what=" (same as a)")


def check_given_stats(stats, num_segments: int, device: torch.device, columns: int = 3,
                      row: str = "one row per segment", ref: str = "a") -> None:
    """Per-segment statistics given to a fused op: float64 [S, columns] on `device` (any stride), or None
    (the K-objective op: columns K(K+1)/2, its buffers named grads[k])."""
    if stats is None:
        return
    if not isinstance(stats, torch.Tensor):
        _fail("stats", f"expected a float64 Tensor or None, got {type(stats).__name__}")
    _tensor("stats", stats)
    if stats.dtype != torch.float64:
        _fail("stats", f"expected dtype float64, got {dtype_name(stats.dtype)}")
    if tuple(stats.shape) != (num_segments, columns):
        _fail("stats", f"expected shape [{num_segments}, {columns}] ({row}), got {tuple(stats.shape)}")
    _on("stats", stats, device, host_ok=False, what=f" (same as {ref})")


def check_step_args(num_segments: int, device: torch.device, active, groups, poison, stats, columns: int = 3,
                    row: str = "one row per segment", ref: str = "a") -> torch.Tensor | None:
    """The checks a training step's call adds to a fused op (groups, active per group or segment,
    poison, given statistics), shared by the two-objective and the K-objective op. Returns the
    groups on the CPU or None."""
    host_groups = None if groups is None else check_groups(groups, num_segments, device)
    if host_groups is None:
        check_active(active, num_segments, device)
    else:
        check_active(active, host_groups.numel() - 1, device, per="group")
    check_poison(poison, device)
    check_given_stats(stats, num_segments, device, columns, row, ref)
    return host_groups


def check_integrate(a, b, offsets, out, active, groups=None, poison=None, stats=None):
    """All tensor checks of the fused op, in the order of csrc/op_args.h (``out`` may be None:
    allocated later). Returns (S, groups on the CPU or None)."""
    check_buffers(a, b)
    s = check_offsets(offsets, a.numel(), a.device)
    if out is not None:
        check_out(out, a, b)
    return s, check_step_args(s, a.device, active, groups, poison, stats)

"""Plain-torch baselines the fused op is benchmarked against (not part of the library's API).

Shared by ``pareto-lora bench`` (:mod:`.benchmarking`) and the suites in bench/. Every baseline
has the signature ``fn(a, b, offsets, out, rule, tau) -> out`` and computes the same
stats -> rule -> combine as ``pareto_lora.integrate``; tests/test_bench_baselines.py checks each
against the float64 reference.

- ``strong``: what a careful user writes. Per-segment views (no copies), BLAS dot products for
  the three statistics, the rule vectorised on the device (the reference's own formula, no host
  sync), the combine written in place into ``out`` with ``mul(out=)`` + ``addcmul_``.
  Accumulation: float32 inputs use float32 ``torch.dot`` (BLAS sdot; the op itself sums exact
  products in float64, so this baseline does *less* work); bf16/fp16 segments are upcast to
  float32 one segment at a time (a segment-sized temporary, cache-resident for small segments)
  because a bf16 ``dot`` returns a bf16-rounded statistic, which no careful user keeps.
- ``foreach``: the multi-tensor path ``clip_grad_norm_`` uses: ``torch._foreach_norm`` for the
  two norms, per-segment dots for a.b, ``_foreach_mul``/``_foreach_addcmul_`` for the combine.
  Meant for CUDA (on CPU the foreach ops fall back to per-tensor loops; it still runs).
- ``compiled``: ``torch.compile(fullgraph=True)`` of the reference's vectorised float32 math
  (segment ids precomputed once, outside the timed call, as a user would cache them).
- ``naive_loop``: research-code style, a Python loop with ``.item()`` host syncs per segment.

The float64 oracle (:mod:`pareto_lora.reference`) is a correctness tool, not a speed baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import reference
from ..rules import RuleSpec, as_spec

__all__ = ["BASELINES", "strong", "foreach", "compiled", "naive_loop", "segment_views"]


def _bounds(offsets: torch.Tensor) -> list[int]:
    # Offsets are a host-side description of the layout (like a model's parameter sizes): reading
    # them is not a device sync on the data.
    return offsets.tolist() if isinstance(offsets, torch.Tensor) else list(offsets)


def segment_views(t: torch.Tensor, offsets) -> list[torch.Tensor]:
    """Views (no copies) of the G segments of the flat buffer `t`."""
    flat, bounds = t.reshape(-1), _bounds(offsets)
    return [flat[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The tensor a careful user takes dot products of: float32 stays, bf16/fp16 are upcast."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _segment_stats(xs, ys) -> torch.Tensor:
    rows = []
    for x, y in zip(xs, ys):
        x, y = _acc(x), _acc(y)
        rows.append(torch.stack([torch.dot(x, x), torch.dot(y, y), torch.dot(x, y)]))
    return torch.stack(rows)


def strong(a, b, offsets, out, rule: str = "pareto_lora", tau: float = 0.5):
    """Per-segment views, BLAS dots, vectorised rule on the device, in-place combine."""
    xs, ys, os_ = segment_views(a, offsets), segment_views(b, offsets), segment_views(out, offsets)
    stats = _segment_stats(xs, ys)
    coeffs, _ = reference.rule_coefficients(stats, as_spec(rule, tau))
    coeffs = coeffs.to(_acc(a[:0]).dtype)
    alpha, beta = coeffs[:, 0].unbind(), coeffs[:, 1].unbind()  # 0-dim device tensors: no sync
    for x, y, o, al, be in zip(xs, ys, os_, alpha, beta):
        if o.dtype == x.dtype == torch.float32:
            torch.mul(x, al, out=o)
            o.addcmul_(y, be)
        else:  # reduced precision: combine in float32, round once
            o.copy_(torch.mul(x.float(), al).addcmul_(y.float(), be))
    return out


def foreach(a, b, offsets, out, rule: str = "pareto_lora", tau: float = 0.5):
    """Multi-tensor (`torch._foreach_*`) statistics and combine over the segment views."""
    xs, ys, os_ = segment_views(a, offsets), segment_views(b, offsets), segment_views(out, offsets)
    xf, yf = [_acc(x) for x in xs], [_acc(y) for y in ys]
    na = torch.stack(torch._foreach_norm(xf))
    nb = torch.stack(torch._foreach_norm(yf))
    dots = torch.stack([torch.dot(x, y) for x, y in zip(xf, yf)])
    stats = torch.stack([na * na, nb * nb, dots], dim=1)
    coeffs, _ = reference.rule_coefficients(stats, as_spec(rule, tau))
    coeffs = coeffs.float()
    alpha, beta = list(coeffs[:, 0].unbind()), list(coeffs[:, 1].unbind())
    res = torch._foreach_mul(xf, alpha)
    torch._foreach_addcmul_(res, yf, beta)
    torch._foreach_copy_(os_, res)
    return out


def _reference_math(spec: RuleSpec):
    # The spec is validated here, outside the graph, and closed over as a constant: validating a
    # symbolic tau (math.isfinite) inside the graph is a graph break, which fullgraph refuses.
    def math_(a, b, seg, num_segments: int):
        stats = reference.stats_by_ids(a, b, seg, num_segments, dtype=torch.float32)
        coeffs, _ = reference.rule_coefficients(stats, spec)
        return reference.combine_by_ids(a, b, seg, coeffs, dtype=torch.float32).to(a.dtype)

    return math_


_COMPILED: dict[tuple, Callable] = {}
_SEG_IDS: dict[tuple, torch.Tensor] = {}


def compiled(a, b, offsets, out, rule: str = "pareto_lora", tau: float = 0.5):
    """torch.compile(fullgraph=True, dynamic=True) of the reference's float32 vectorised math."""
    spec = as_spec(rule, tau)
    fn = _COMPILED.get((spec.name, spec.tau))
    if fn is None:
        fn = _COMPILED[(spec.name, spec.tau)] = torch.compile(_reference_math(spec), fullgraph=True, dynamic=True)
    bounds = _bounds(offsets)
    key = (tuple(bounds), a.device)
    seg = _SEG_IDS.get(key)
    if seg is None:
        _SEG_IDS.clear()  # one layout at a time: the ids are N int64s
        seg = _SEG_IDS[key] = reference.segment_ids(torch.tensor(bounds), a.device)
    out.reshape(-1).copy_(fn(a.reshape(-1), b.reshape(-1), seg, len(bounds) - 1))
    return out


def naive_loop(a, b, offsets, out, rule: str = "pareto_lora", tau: float = 0.5):
    """Pareto LoRA (Algorithm 1) segment by segment with host syncs (research-code style)."""
    if rule != "pareto_lora":
        raise ValueError(f"naive_loop implements only rule='pareto_lora', got {rule!r}")
    bounds = _bounds(offsets)
    flat_a, flat_b, flat_o = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x, y = flat_a[lo:hi].float(), flat_b[lo:hi].float()
        na, nb, dot = x.norm().item(), y.norm().item(), torch.dot(x, y).item()
        if na == 0 or nb == 0:
            g = x + y
        elif dot < 0:
            d = na * na + nb * nb - 2 * dot
            lam = min(max((nb * nb - dot) / d, 0.0), 1.0) if d > 0 else 0.5
            g = lam * x + (1 - lam) * y
        elif na > tau * nb:
            g = x * (nb / na) + y if na < nb else x + y * (na / nb)
        else:
            g = x + y
        flat_o[lo:hi] = g.to(out.dtype)
    return out


# name -> (function, device types it is meant for)
BASELINES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "strong": (strong, ("cpu", "cuda")),
    "foreach": (foreach, ("cuda",)),
    "compiled": (compiled, ("cpu", "cuda")),
    "naive_loop": (naive_loop, ("cpu", "cuda")),
}

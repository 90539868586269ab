"""Reusable microbenchmark pieces: input builders, a timer, traffic model, the table.

Used by ``pareto-lora bench`` and by the pytest-benchmark suites in bench/. Timings are the
median of repeated calls after warm-up, with a device synchronise around each call on GPUs.

Bandwidth is *modelled* traffic divided by time: the fused op reads both gradients in its
statistics pass, reads them again in the combine pass and writes the output once, i.e.
``5 * numel * itemsize`` bytes (the [G, 3] statistics are negligible). A kernel that keeps data
in cache can exceed the memory bandwidth by that measure; the reference, which upcasts to
float64 and materialises temporaries, moves far more than it is credited with.
May import: :mod:`pareto_lora.ops`, :mod:`pareto_lora.reference`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .. import ops, reference

__all__ = ["BenchCase", "make_inputs", "time_call", "modelled_bytes", "bench_integrate", "run_suite", "format_rows"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclasses.dataclass(frozen=True)
class BenchCase:
    numel: int
    segments: int
    dtype: torch.dtype
    device: str
    rule: str = "pareto_lora"


def make_inputs(case: BenchCase, seed: int = 0):
    """(a, b, offsets): two correlated gradients of unequal norm over `case.segments` uneven segments.

    The image-like gradient `b` is a tenth of the text-like `a` plus noise with a negative
    component, so all rule branches (rescale, Pareto, sum) occur across segments.
    """
    if case.numel < case.segments:
        raise ValueError(f"numel: expected at least one element per segment ({case.segments}), got {case.numel}")
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(case.numel, generator=gen)
    b = 0.1 * (torch.randn(case.numel, generator=gen) - 0.3 * a)
    weights = torch.rand(case.segments, generator=gen) + 0.5
    sizes = (weights / weights.sum() * case.numel).floor().to(torch.int64)
    sizes[-1] += case.numel - int(sizes.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    dev = torch.device(case.device)
    return a.to(case.dtype).to(dev), b.to(case.dtype).to(dev), offsets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: str | torch.device = "cpu", warmup: int = 3, repeat: int = 20,
              max_seconds: float = 2.0) -> float:
    """Median wall time of `fn()` in seconds (stops repeating after `max_seconds` of timed calls)."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while len(times) < repeat and (len(times) < 3 or time.perf_counter() < budget_end):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def modelled_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes the fused integrate must move at least: 2 passes over a and b, one output write."""
    return 5 * numel * torch.empty((), dtype=dtype).element_size()


def bench_integrate(case: BenchCase, backend: str, **timer) -> dict:
    """One table row: median time of ``integrate`` (or the reference) on `case`."""
    a, b, offsets = make_inputs(case)
    out = torch.empty_like(a)
    if backend == "reference":
        fn = lambda: reference.integrate(a, b, offsets, out, case.rule)  # noqa: E731
    else:
        fn = lambda: ops.integrate(a, b, offsets, out, rule=case.rule, backend=backend)  # noqa: E731
    seconds = time_call(fn, case.device, **timer)
    return {
        "backend": backend,
        "device": case.device,
        "dtype": str(case.dtype).replace("torch.", ""),
        "numel": case.numel,
        "segments": case.segments,
        "rule": case.rule,
        "ms": seconds * 1e3,
        "GB/s": modelled_bytes(case.numel, case.dtype) / seconds / 1e9,
    }


def run_suite(device: str, sizes: Sequence[int], dtypes: Sequence[torch.dtype], segments: int = 64,
              rule: str = "pareto_lora", backends: Sequence[str] | None = None, progress=None, **timer) -> list[dict]:
    """Rows for every (size, dtype, backend); `backends` defaults to what runs on `device`.

    Each row gets ``speedup`` = reference time / its time for the same size and dtype.
    """
    names = list(backends) if backends is not None else ops.available_backends(device)
    if "reference" not in names:
        names.append("reference")
    rows = []
    for numel in sizes:
        for dtype in dtypes:
            case = BenchCase(int(numel), segments, dtype, device, rule)
            group = [bench_integrate(case, be, **timer) for be in names]
            ref_ms = next(r["ms"] for r in group if r["backend"] == "reference")
            for r in group:
                r["speedup"] = ref_ms / r["ms"]
            rows.extend(group)
            if progress is not None:
                progress.update(1)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'backend':<10} {'device':<6} {'dtype':<9} {'numel':>10} {'segs':>5} {'ms':>10} {'GB/s':>8} {'x ref':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:<10} {r['device']:<6} {r['dtype']:<9} {r['numel']:>10,} {r['segments']:>5} "
                     f"{r['ms']:>10.4g} {r['GB/s']:>8.3g} {r['speedup']:>7.1f}")
    return "\n".join(lines)

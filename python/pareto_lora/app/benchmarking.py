"""Reusable microbenchmark pieces: inputs, an interleaved timer, the physical floors, the table.

Used by ``pareto-lora bench`` and by the benchmark scripts in bench/ (same contenders, same
columns). Method, chosen for a shared, noisy machine:

- every contender of one case (the compiled backends, the plain-torch baselines of
  :mod:`.baselines`, and a ``copy_`` of the same footprint) runs once per round, round-robin, in
  one process, so that load changes hit all of them alike; each gets min and median over rounds
  (minima are the trustworthy figure when other processes steal cycles);
- traffic: the op must read ``a`` and ``b`` and write ``out`` once: 3N elements
  (``one_pass_bytes``). A stats-then-combine implementation whose data does not stay in cache
  moves 5N (``two_pass_bytes``). The **floors** are those byte counts at the copy bandwidth
  measured in the same rounds, with a copy of the same footprint (1.5N elements read, 1.5N
  written: same cache level as the op) at the same thread count;
- each row: min and median ms, effective GB/s over 3N bytes, time / two-pass floor, time /
  one-pass floor, and the speed-up over each baseline (baseline min / row min).

The float64 reference (``backend="reference"``) is a correctness oracle, not a speed contender:
it is never timed here (:func:`contenders` refuses it), so no table has a row for it.
:func:`environment` gives the lines that go with every table (date, CPU model, threads, torch,
load average).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import subprocess
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .. import ops
from .baselines import BASELINES
from .env import cpu_model

__all__ = ["BenchCase", "make_inputs", "interleaved", "one_pass_bytes", "two_pass_bytes", "contenders",
           "bench_case", "run_suite", "format_rows", "COLUMNS", "ORACLE", "environment", "cpu_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
COPY = "copy"  # the pseudo-contender that measures the bandwidth of the case's footprint
ORACLE = "reference"  # the float64 backend: a correctness tool, never timed here


@dataclasses.dataclass(frozen=True)
class BenchCase:
    numel: int
    segments: int
    dtype: torch.dtype
    device: str
    rule: str = "pareto_lora"
    tau: float = 0.5


def make_inputs(case: BenchCase, seed: int = 0):
    """(a, b, offsets): two correlated gradients of unequal norm over `case.segments` random-size segments.

    Segment sizes are uniform in [0.5, 1.5] x N/G. The image-like gradient `b` is a tenth of the
    text-like `a` plus noise with a negative component, so all rule branches occur.
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


def interleaved(fns: dict[str, Callable[[], object]], device: str | torch.device = "cpu", rounds: int = 10,
                warmup: int = 2, max_seconds: float | None = None) -> dict[str, dict]:
    """Round-robin timing: {name: {"min": s, "median": s, "rounds": n, "times": [s per round]}}.

    All contenders run once per round in the given order (rotated each round so none always
    follows the same neighbour). Stops early after `max_seconds` once 3 rounds are done.
    """
    dev = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(dev)
    times: dict[str, list[float]] = {n: [] for n in names}
    end = None if max_seconds is None else time.perf_counter() + max_seconds
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            _sync(dev)
            t0 = time.perf_counter()
            fns[n]()
            _sync(dev)
            times[n].append(time.perf_counter() - t0)
        if end is not None and r >= 2 and time.perf_counter() > end:
            break
    return {n: {"min": min(t), "median": statistics.median(t), "rounds": len(t), "times": t} for n, t in times.items()}


def median_ci(xs: Sequence[float]) -> tuple[float, float, float]:
    """Median and a distribution-free 95% interval (binomial order statistics) of paired ratios."""
    xs = sorted(xs)
    n = len(xs)
    half = 1.96 * math.sqrt(n) / 2
    lo, hi = max(0, int(math.floor(n / 2 - half))), min(n - 1, int(math.ceil(n / 2 + half)))
    mid = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
    return mid, xs[lo], xs[hi]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def one_pass_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes the op must move at least: read a and b once, write out once."""
    return 3 * numel * _itemsize(dtype)


def two_pass_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of stats-then-combine when nothing stays cached: a and b read twice, out written once."""
    return 5 * numel * _itemsize(dtype)


def contenders(case: BenchCase, a, b, offsets, out, backends: Sequence[str], baselines: Sequence[str]):
    """{name: zero-argument callable} for the backends (named as they are), the baselines
    (``torch:<name>``) and the footprint copy. The float64 oracle is refused: it is no contender."""
    if ORACLE in backends:
        raise ValueError(f"backends: {ORACLE!r} is the float64 correctness oracle, not a speed contender")
    fns: dict[str, Callable[[], object]] = {}
    for be in backends:
        fns[be] = lambda be=be: ops.integrate(a, b, offsets, out, rule=case.rule, tau=case.tau, backend=be)
    for name in baselines:
        fn = BASELINES[name][0]
        fns[f"torch:{name}"] = lambda fn=fn: fn(a, b, offsets, out, case.rule, case.tau)
    half = (3 * case.numel) // 2
    src = torch.empty(half, dtype=case.dtype, device=case.device).uniform_()
    dst = torch.empty_like(src)
    fns[COPY] = lambda: dst.copy_(src)
    return fns


def bench_case(case: BenchCase, backends: Sequence[str], baselines: Sequence[str], rounds: int = 10,
               max_seconds: float | None = None) -> list[dict]:
    """Rows for one case: every backend and baseline, timed round-robin with the footprint copy."""
    a, b, offsets = make_inputs(case)
    out = torch.empty_like(a)
    fns = contenders(case, a, b, offsets, out, backends, baselines)
    timed = interleaved(fns, case.device, rounds=rounds, max_seconds=max_seconds)
    copy_s = timed.pop(COPY)["min"]
    copy_gbps = 2 * ((3 * case.numel) // 2) * _itemsize(case.dtype) / copy_s / 1e9
    one, two = one_pass_bytes(case.numel, case.dtype), two_pass_bytes(case.numel, case.dtype)
    base_min = {n: t["min"] for n, t in timed.items() if n.startswith("torch:")}
    rows = []
    for name, t in timed.items():
        rows.append({
            "impl": name, "device": case.device, "dtype": str(case.dtype).replace("torch.", ""),
            "numel": case.numel, "segments": case.segments, "rule": case.rule,
            "threads": torch.get_num_threads() if case.device == "cpu" else None,
            "min_ms": t["min"] * 1e3, "median_ms": t["median"] * 1e3, "rounds": t["rounds"],
            "GB/s": one / t["min"] / 1e9, "copy_GB/s": copy_gbps,
            "x_floor2": t["min"] / (two / (copy_gbps * 1e9)), "x_floor1": t["min"] / (one / (copy_gbps * 1e9)),
            "speedup": {n.split(":", 1)[1]: s / t["min"] for n, s in base_min.items()},
        })
    return rows


def default_backends(device: str) -> list[str]:
    """The backends timed by default on `device`: every available one except the float64 oracle."""
    return [b for b in ops.available_backends(device) if b != ORACLE]


def default_baselines(device: str) -> list[str]:
    """The plain-torch baselines meant for `device`'s kind (``torch:foreach`` only on CUDA)."""
    kind = torch.device(device).type
    return [n for n, (_, kinds) in BASELINES.items() if kind in kinds]


def run_suite(device: str, sizes: Sequence[int], dtypes: Sequence[torch.dtype], segments: Sequence[int] | int = 64,
              rule: str = "pareto_lora", backends: Sequence[str] | None = None,
              baselines: Sequence[str] | None = None, progress=None, rounds: int = 10,
              max_seconds: float | None = None) -> list[dict]:
    """Rows for every (size, dtype, segments) case; `backends` defaults to the compiled ones on
    `device` (never the float64 oracle), `baselines` to every baseline meant for it."""
    names = list(backends) if backends is not None else default_backends(device)
    base = list(baselines) if baselines is not None else default_baselines(device)
    rows = []
    for numel in sizes:
        for dtype in dtypes:
            for g in ([segments] if isinstance(segments, int) else segments):
                rows.extend(bench_case(BenchCase(int(numel), int(g), dtype, device, rule), names, base, rounds,
                                       max_seconds))
                if progress is not None:
                    progress.update(1)
    return rows


COLUMNS = ("impl", "device", "dtype", "numel", "segs", "threads", "min ms", "med ms", "GB/s(3N)", "copy GB/s",
           "/2-pass", "/1-pass")


def format_rows(rows: list[dict], markdown: bool = False) -> str:
    """The table: one row per contender (the columns of bench/RESULTS.md). `GB/s(3N)` is 3N bytes over
    the min time; `copy GB/s` the bandwidth of the same-footprint ``copy_`` timed in the same rounds;
    `/2-pass`, `/1-pass` are the min time over 5N and 3N bytes at that bandwidth (1.0 = at the
    floor); `x <baseline>` is that baseline's min time over the row's."""
    bases = list(dict.fromkeys(k for r in rows for k in r["speedup"]))
    head = list(COLUMNS) + [f"x {b}" for b in bases]
    body = []
    for r in rows:
        body.append([r["impl"], r["device"], r["dtype"], f"{r['numel']:,}", str(r["segments"]),
                     "-" if r["threads"] is None else str(r["threads"]), f"{r['min_ms']:.4g}", f"{r['median_ms']:.4g}",
                     f"{r['GB/s']:.3g}", f"{r['copy_GB/s']:.3g}", f"{r['x_floor2']:.2f}", f"{r['x_floor1']:.2f}"]
                    + [f"{r['speedup'][b]:.2f}" if b in r["speedup"] else "-" for b in bases])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: " ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), "-" * (sum(widths) + len(widths) - 1)] + [fmt(c) for c in body])


def uptime() -> str:
    """`uptime`'s line (time, load average), recorded before and after a benchmark run."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def cpu_kernels() -> str:
    """The CPU build of the op's kernels in use ("avx512", "avx2", "base"), or "not built"."""
    try:
        from .. import _C
    except ImportError:
        return "not built"
    return _C.cpu_capability()


def environment(device: str) -> str:
    """One line to print with every table: UTC date, the device (CPU model and logical CPUs, or the
    GPU's name; on CPU the op's kernel build), torch's intra-op threads, torch version, and the load average (1, 5, 15 min)."""
    if torch.device(device).type == "cuda":
        where = f"{torch.cuda.get_device_name(torch.device(device))}; host CPU {cpu_model()}"
    else:
        where = f"{cpu_model()} ({os.cpu_count()} logical CPUs, {cpu_kernels()} kernels)"
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return (f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {device}: {where}; "
            f"{torch.get_num_threads()} threads; torch {torch.__version__}; load average {load}")

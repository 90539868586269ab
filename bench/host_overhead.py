"""Where the per-call time of a small integration goes on the host: Python API vs the op vs torch.

    python bench/host_overhead.py [--device cuda|cpu] [--calls 300]

For small inputs a GPU call costs more host time than kernel time (RESULTS.md, GPU section: ~100-130
us per call from Python against 19-28 us of kernel). This script splits that time, per case:

* ``api``      ``pareto_lora.integrate`` (argument checks, backend choice, result object) + below;
* ``op``       ``torch.ops.pareto_lora.integrate`` alone (dispatcher, validation, on CUDA the
               host-built schedule, its pinned upload, the launch);
* ``stats``, ``combine``: the op's two halves as separate ops;
* ``torch add``: ``torch.add(a, b, out=out)``, one plain torch kernel launch of the same size;
* ``upload`` (CUDA): a pinned host tensor of 64 int64 copied non-blocking to the device, what the
  op does once per call for its schedule.

Each is timed two ways, in one process, contenders interleaved: ``async`` = wall time of `calls`
back-to-back calls then one synchronize, divided by `calls` (the host's cost per call when the
device keeps up); ``sync`` = min over calls of one call + synchronize (host + device latency). On
the CPU the two agree (no queue). Prints a Markdown table and the environment line.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import pareto_lora
from pareto_lora.app.benchmarking import environment, uptime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call(fn, device: torch.device, calls: int) -> tuple[float, float]:
    """(async seconds per call, min seconds of one synchronized call)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    async_s = (time.perf_counter() - t0) / calls
    best = float("inf")
    for _ in range(max(10, calls // 10)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return async_s, best


def contenders(numel: int, g: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(numel + g)
    a = torch.randn(numel, generator=gen).to(device)
    b = (-0.3 * a.cpu() + torch.randn(numel, generator=gen)).to(device)
    out = torch.empty_like(a)
    offsets = torch.linspace(0, numel, g + 1).long()  # on the CPU, as the op wants them
    coeffs = torch.rand(g, 2, generator=gen).to(device)
    ops = torch.ops.pareto_lora
    params = list(pareto_lora.RuleSpec().kernel_params())  # the default rule, as the op takes it
    fns = {
        "api": lambda: pareto_lora.integrate(a, b, offsets, out=out),
        "op": lambda: ops.integrate(a, b, offsets, out, "pareto_lora", params, None),
        "stats": lambda: ops.segment_stats(a, b, offsets),
        "combine": lambda: ops.combine(a, b, offsets, coeffs, out),
        "torch add": lambda: torch.add(a, b, out=out),
    }
    if device.type == "cuda":
        words = torch.arange(64)

        def upload():
            words.pin_memory().to(device, non_blocking=True)

        fns["upload"] = upload
    return fns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(environment(args.device))
    print(f"uptime before: {uptime()}\n")
    cases = [(1024, 1), (65536, 1), (65536, 64), (1 << 20, 1), (1 << 20, 1024)]
    names = None
    rows = []
    for numel, g in cases:
        fns = contenders(numel, g, device)
        names = list(fns)
        for fn in fns.values():  # warm up: first calls allocate, load, compile nothing
            fn()
        times = {n: per_call(fns[n], device, args.calls) for n in names}
        rows.append((numel, g, times))
    head = "| N | G | " + " | ".join(f"{n} async / sync us" for n in names) + " |"
    print(head)
    print("|---:|---:|" + "---:|" * len(names))
    for numel, g, times in rows:
        cells = " | ".join(f"{times[n][0] * 1e6:.1f} / {times[n][1] * 1e6:.1f}" for n in names)
        print(f"| {numel:,} | {g} | {cells} |")
    print(f"\nuptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

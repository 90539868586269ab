"""Prints a bandwidth table (GB/s, fraction of copy bandwidth, speed-ups) after the benchmarks.

Each benchmark stores extra_info: group (the input configuration), impl, bytes (the bytes the op
must move: read a and b once, write out once). The device's copy bandwidth is measured once
per session with a large copy (bytes read + bytes written).
"""

import time

import pytest
import torch

_COPY_GBPS = {}


def copy_bandwidth(device="cpu", nbytes=512 << 20, reps=5):
    if device not in _COPY_GBPS:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        _COPY_GBPS[device] = 2 * nbytes / best / 1e9
    return _COPY_GBPS[device]


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if not session or not session.benchmarks:
        return
    rows = {}
    for bench in session.benchmarks:
        info = bench.extra_info
        if "group" not in info:
            continue
        rows.setdefault(info["group"], {})[info["impl"]] = (bench.stats.median, info["bytes"], info.get("device", "cpu"))
    tw = terminalreporter
    tw.write_line("")
    tw.write_line("| config | impl | median ms | GB/s (3N bytes) | of copy BW | speed-up vs each baseline |")
    tw.write_line("|---|---|---|---|---|---|")
    for group, impls in rows.items():
        for impl, (t, nbytes, device) in impls.items():
            gbps = nbytes / t / 1e9
            frac = gbps / copy_bandwidth(device)
            ups = ", ".join(f"{o}: {t2 / t:.1f}x" for o, (t2, _, _) in impls.items() if o != impl)
            tw.write_line(f"| {group} | {impl} | {t * 1e3:.2f} | {gbps:.2f} | {frac:.0%} | {ups} |")
    for device, gbps in _COPY_GBPS.items():
        tw.write_line(f"copy bandwidth ({device}, read+write): {gbps:.1f} GB/s")

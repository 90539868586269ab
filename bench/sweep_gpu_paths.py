#!/usr/bin/env python
"""Where should the CUDA op switch between its launch plans?  (numbers, not assertions)

    OUT=/tmp/out python bench/sweep_gpu_paths.py          # needs a CUDA device

Times the compiled op's launch plans (PARETO_LORA_CUDA_PATH = each of PLANS; "plan:0" also sets
PARETO_LORA_CUDA_ONE_PASS=0) and the Triton backend over a grid of sizes and segment counts,
contenders interleaved round-robin in one process (minimum over rounds of per-round medians), and,
for each compiled plan, the device time of its kernels alone from the profiler (so host overhead
-- schedule, upload, dispatch -- and kernel time are told apart) and the host time per call when
calls are queued back to back without a sync ("host_us": the rate the CPU can issue them). The
strong torch baselines (pareto_lora.app.baselines: torch_foreach, torch_strong) join at the
issue's target rows (16M and 128M elements, G = 64 and 1024). Writes $OUT/sweep_gpu.csv and
prints each time over the two-pass (5N bytes) floor at the copy bandwidth measured in the same run.

PARETO_LORA_SWEEP_NUMELS / _GS / _PLANS override the grid (comma lists).
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import Case, _parse_numel, measure_copy_gbps  # noqa: E402

import pareto_lora  # noqa: E402
from pareto_lora.app import baselines  # noqa: E402

RULE, TAU = "pareto_lora", 0.5
NUMELS = [_parse_numel(t) for t in os.environ.get("PARETO_LORA_SWEEP_NUMELS", "1M,4M,16M,64M,128M").split(",")]
GS = [int(t) for t in os.environ.get("PARETO_LORA_SWEEP_GS", "1,8,64,256,1024,4096").split(",")]
PLANS = [t for t in os.environ.get("PARETO_LORA_SWEEP_PLANS", "fused,two_pass,fused:0,two_pass:0").split(",") if t]
BASELINE_ROWS = {(16 << 20, 64), (16 << 20, 1024), (128 << 20, 64), (128 << 20, 1024)}
DTYPES = [torch.float32, torch.bfloat16]
ROUNDS = 3


def run_plan(plan):
    if plan in ("torch_foreach", "torch_strong"):
        base = baselines.BASELINES[plan.split("_")[1]][0]

        def fn(case, i):
            a, b, out = case.sets[i % case.num_sets]
            base(a, b, case.offsets, out, RULE, TAU)

        return fn
    path, _, one_pass = plan.partition(":")

    def fn(case, i):
        a, b, out = case.sets[i % case.num_sets]
        if plan == "triton":
            pareto_lora.integrate(a, b, case.offsets, out=out, rule=RULE, tau=TAU, backend="triton")
        else:
            os.environ["PARETO_LORA_CUDA_PATH"] = path
            os.environ["PARETO_LORA_CUDA_ONE_PASS"] = one_pass or "1"
            pareto_lora.integrate(a, b, case.offsets, out=out, rule=RULE, tau=TAU, backend="cpp")

    return fn


def host_us(fn, case, calls=50):
    """Host time per call with calls queued back to back (no sync in between)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(case, i)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def median_ms(fn, case, iters):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (s, e) in enumerate(ev):
        s.record()
        fn(case, i)
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


def kernel_ms(fn, case, iters=5):
    """Mean device time per call of the CUDA kernels the call launched (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            fn(case, i)
        torch.cuda.synchronize()
    total_us = 0.0
    for ev in prof.key_averages():
        if "integrate" in ev.key or "rule_kernel" in ev.key:
            total_us += getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0))
    return total_us / 1e3 / iters


def main():
    out_dir = os.environ.get("OUT", ".")
    contenders = PLANS + (["triton"] if "triton" in pareto_lora.available_backends("cuda") else [])
    bw = measure_copy_gbps()
    print(f"{torch.cuda.get_device_name(0)}  copy {bw:.0f} GB/s  torch {torch.__version__}", flush=True)
    path = os.path.join(out_dir, "sweep_gpu.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["numel", "dtype", "G", "impl", "min_median_ms", "kernel_ms", "host_us", "over_5N_floor",
                    "copy_GBps"])
        t_start = time.perf_counter()
        for numel in NUMELS:
            for dtype in DTYPES:
                for g in GS:
                    case = Case(numel, dtype, g)
                    floor_ms = 5 * numel * case.sets[0][0].element_size() / (bw * 1e9) * 1e3
                    here = contenders + (["torch_foreach", "torch_strong"] if (numel, g) in BASELINE_ROWS else [])
                    fns = {c: run_plan(c) for c in here}
                    for c in here:  # warm-up (Triton compiles, caches fill)
                        for i in range(3):
                            fns[c](case, i)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fns[contenders[0]](case, 0)
                    torch.cuda.synchronize()
                    iters = int(min(100, max(5, 0.03 / max(time.perf_counter() - t0, 1e-6))))
                    best = {c: float("inf") for c in here}
                    for _ in range(ROUNDS):
                        for c in here:
                            best[c] = min(best[c], median_ms(fns[c], case, iters if c in contenders else 5))
                    line = [f"{numel >> 20}M {str(dtype)[6:]:8s} G={g:5d}"]
                    for c in here:
                        compiled = c in PLANS
                        kms = kernel_ms(fns[c], case) if compiled else float("nan")
                        hus = host_us(fns[c], case) if compiled and numel <= (16 << 20) else float("nan")
                        w.writerow([numel, str(dtype)[6:], g, c, f"{best[c]:.5f}", f"{kms:.5f}", f"{hus:.1f}",
                                    f"{best[c] / floor_ms:.3f}", f"{bw:.0f}"])
                        line.append(f"{c} {best[c]:.4f} ({best[c] / floor_ms:.2f}x k{kms:.4f} h{hus:.0f})")
                    f.flush()
                    print("  ".join(line), flush=True)
                    del case
                    torch.cuda.empty_cache()
        os.environ.pop("PARETO_LORA_CUDA_PATH", None)
        os.environ.pop("PARETO_LORA_CUDA_ONE_PASS", None)
        print(f"sweep done in {time.perf_counter() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()

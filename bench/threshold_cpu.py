"""Where one pass beats two on the CPU: equal segments of S elements, N = 16M, both paths forced.

    python bench/threshold_cpu.py [threads]

Prints, per segment size, the min over interleaved rounds of PARETO_LORA_CPU_PATH=one_pass and
=two_pass and their ratio; the crossover sets kOnePassMaxBytes in csrc/cpu/segment_kernels.cpp.
"""

import os
import sys

import torch

import pareto_lora
from pareto_lora.app.benchmarking import interleaved

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
N = 1 << 24
print(f"{threads} thread(s); N = 16M; min of 12 interleaved rounds")
print("| dtype | S (elements) | a+b per segment | one pass ms | two pass ms | one/two |")
print("|---|---:|---:|---:|---:|---:|")
for dtype in (torch.float32, torch.bfloat16):
    a = torch.randn(N).to(dtype)
    b = (-0.3 * a.float() + torch.randn(N)).to(dtype)
    out = torch.empty_like(a)
    for s in (1 << 14, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 22):
        offsets = torch.arange(0, N + 1, s)

        def run(path):
            def f():
                os.environ["PARETO_LORA_CPU_PATH"] = path
                pareto_lora.integrate(a, b, offsets, out=out, backend="cpp")
            return f

        t = interleaved({"one": run("one_pass"), "two": run("two_pass")}, rounds=12)
        os.environ.pop("PARETO_LORA_CPU_PATH")
        kib = 2 * s * a.element_size() >> 10
        print(f"| {str(dtype)[6:]} | {s:,} | {kib:,} KiB | {t['one']['min'] * 1e3:.2f} | {t['two']['min'] * 1e3:.2f} | "
              f"{t['one']['min'] / t['two']['min']:.2f} |", flush=True)

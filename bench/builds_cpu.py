"""The CPU op's kernel builds side by side: statistics, combine and the fused op per build.

    python bench/builds_cpu.py [threads] [builds]      # e.g. 1 avx2,avx512 (default: all this CPU runs)

Each case times every build (PARETO_LORA_CPU_CAPABILITY, set before each call) round-robin in one
process, min of the rounds, microseconds per call; the builds give bitwise the same results
(tests/backends/test_cpu_capability.py), so this is their speed alone.
"""

import os
import sys

import torch

import pareto_lora  # noqa: F401  (registers the ops)
from pareto_lora import _C
from pareto_lora.app.benchmarking import cpu_model, interleaved, uptime


def main(argv):
    threads = int(argv[0]) if argv else 1
    builds = argv[1].split(",") if len(argv) > 1 else list(_C.cpu_capabilities())
    torch.set_num_threads(threads)
    print(f"{cpu_model()}; {threads} thread(s); torch {torch.__version__}; builds {builds}; {uptime()}")
    print("| dtype | N | G | op | " + " | ".join(f"{b} us" for b in builds) + " |")
    print("|---|---:|---:|---|" + "---:|" * len(builds))
    ops = torch.ops.pareto_lora
    params = list(pareto_lora.RuleSpec().kernel_params())  # the default rule, as the op takes it
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for numel, g in ((1 << 16, 1), (1 << 20, 1), (1 << 20, 64), (16 << 20, 1), (16 << 20, 1024)):
            a = torch.randn(numel).to(dtype)
            b = (-0.3 * a.float() + torch.randn(numel)).to(dtype)
            out = torch.empty_like(a)
            offsets = torch.linspace(0, numel, g + 1).long()
            coeffs = torch.tensor([[0.5, 0.25]] * g)
            calls = {
                "stats": lambda: ops.segment_stats(a, b, offsets),
                "combine": lambda: ops.combine(a, b, offsets, coeffs, out),
                "integrate": lambda: ops.integrate(a, b, offsets, out, "pareto_lora", params, None),
            }
            rounds = 40 if numel <= (1 << 20) else 10
            for op, call in calls.items():
                def with_build(build, call=call):
                    def f():
                        os.environ["PARETO_LORA_CPU_CAPABILITY"] = build
                        call()
                    return f

                t = interleaved({bd: with_build(bd) for bd in builds}, rounds=rounds)
                cells = " | ".join(f"{t[bd]['min'] * 1e6:.1f}" for bd in builds)
                print(f"| {str(dtype)[6:]} | {numel:,} | {g} | {op} | {cells} |", flush=True)
    os.environ.pop("PARETO_LORA_CPU_CAPABILITY", None)
    print(uptime())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

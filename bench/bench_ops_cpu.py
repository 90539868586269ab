"""CPU benchmark of the fused op against the plain-torch baselines and the memory floors.

    python bench/bench_ops_cpu.py                      # the whole grid, ~5 minutes
    python bench/bench_ops_cpu.py --numels 16M --threads 2 --segments 1024 --rounds 30
    PARETO_LORA_CPU_CAPABILITY=avx2 python bench/bench_ops_cpu.py --numels 16M --segments 64 \
        --dtypes float32,bfloat16,float16 --baselines ''   # what an AVX2-only CPU runs (RESULTS.md)

Grid: N in {1M, 16M, 64M} x {float32, bfloat16} x G in {1, 64, 1024 random sizes} x {1, 2}
threads. Contenders (pareto_lora.app.baselines, shared with `pareto-lora bench`): the compiled op
(`cpp`), torch:strong, torch:compiled, torch:naive_loop, plus a copy_ of the same footprint that
gives the floors; all interleaved round-robin in this process, min and median over rounds
(pareto_lora.app.benchmarking). Prints the environment (command, date, CPU, torch, threads,
`uptime` before and after: this machine is shared) and one Markdown table per thread count.
Numbers only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from pareto_lora.app.benchmarking import cpu_kernels, cpu_model, format_rows, run_suite, uptime


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(text[:-1] if text[-1] in "KM" else text) * mult


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numels", default="1M,16M,64M")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--segments", default="1,64,1024")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--baselines", default="strong,compiled,naive_loop")
    p.add_argument("--rounds", type=int, default=15, help="rounds per case (64M cases: a third, at least 4)")
    args = p.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    segments = [int(g) for g in args.segments.split(",")]
    base = [b for b in args.baselines.split(",") if b]
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical CPUs); op kernels: {cpu_kernels()}; torch {torch.__version__}")
    print(f"uptime before: {uptime()}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        rows = []
        for numel in [_size(n) for n in args.numels.split(",")]:
            rounds = args.rounds if numel < (32 << 20) else max(4, args.rounds // 3)
            rows += run_suite("cpu", [numel], dtypes, segments, backends=["cpp"], baselines=base, rounds=rounds)
            print(f"  ... {numel >> 20}M done ({threads} threads), {uptime()}", file=sys.stderr, flush=True)
        print(f"\n### {threads} thread{'s' if threads > 1 else ''}\n")
        print(format_rows(rows, markdown=True))
    print(f"\nuptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU benchmark of the K-objective ops (gram, combine_many) against plain torch and the memory floor.

    python bench/bench_multi.py                        # K = 2, 3, 4, 8 x float32, bf16; 16M x 64 segments
    python bench/bench_multi.py --ks 2,8 --threads 1 --rounds 5

Per (K, dtype, thread count), interleaved round-robin in this process (pareto_lora.app.benchmarking
.interleaved; min and median over the rounds):
* gram: the compiled op (`cpp`); `torch:dots`, the K(K+1)/2 float32 `torch.dot`s per segment on
  views (bf16: each segment's K views upcast to float32 first, as a careful user keeps float32
  statistics); `torch:stack_mm`, one `torch.stack` to [K, N] and one float32 X_s X_s^T per segment;
  at K = 2 the two-objective `segment_stats`.
* combine_many: `cpp`; `torch:strong`, per segment `torch.mul(out=)` and K - 1 `add_(alpha=)` in
  place (bf16: into a float32 scratch segment, rounded once into out); at K = 2 the two-objective
  `combine`.
* floor: a `copy_` that moves the op's minimum bytes (gram: K reads of N; combine: K reads + 1
  write), timed in the same rounds. `/floor` = time / floor; `x torch` = the best plain-torch
  contender's min / the row's min.
Prints the command, date, CPU model, the op's CPU build, torch and `uptime` before and after.
Numbers only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

import pareto_lora
from pareto_lora.app.benchmarking import cpu_kernels, cpu_model, interleaved, uptime

OPS = torch.ops.pareto_lora


def _size(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    o = offsets.tolist()
    return list(zip(o[:-1], o[1:]))


def torch_dots(grads, bounds, wide: bool):
    out = torch.empty(len(bounds), len(grads) * (len(grads) + 1) // 2)
    for s, (lo, hi) in enumerate(bounds):
        x = [g[lo:hi].float() if wide else g[lo:hi] for g in grads]
        row = [torch.dot(x[i], x[j]) for i in range(len(x)) for j in range(i, len(x))]
        out[s] = torch.stack(row)
    return out


def torch_stack_mm(grads, bounds):
    x = torch.stack(grads).float()
    rows, cols = torch.triu_indices(len(grads), len(grads))
    return torch.stack([(x[:, lo:hi] @ x[:, lo:hi].T)[rows, cols] for lo, hi in bounds])


def torch_combine(grads, bounds, coeffs, out, scratch):
    c = coeffs.tolist()
    for s, (lo, hi) in enumerate(bounds):
        acc = out[lo:hi] if scratch is None else scratch[: hi - lo]
        torch.mul(grads[0][lo:hi], c[s][0], out=acc)
        for k in range(1, len(grads)):
            acc.add_(grads[k][lo:hi], alpha=c[s][k])
        if scratch is not None:
            out[lo:hi].copy_(acc)


def run_case(k, dtype, numel, segments, rounds):
    gen = torch.Generator().manual_seed(k)
    grads = [torch.randn(numel, generator=gen).to(dtype) for _ in range(k)]
    offsets = torch.linspace(0, numel, segments + 1).round().to(torch.int64)
    bounds = _bounds(offsets)
    coeffs = torch.rand(segments, k, generator=gen)
    out = torch.empty_like(grads[0])
    wide = dtype != torch.float32
    scratch = torch.empty(max(hi - lo for lo, hi in bounds)) if wide else None
    item = grads[0].element_size()
    gram_src, gram_dst = torch.empty(k * numel // 2, dtype=dtype), torch.empty(k * numel // 2, dtype=dtype)
    comb_n = (k + 1) * numel // 2
    comb_src, comb_dst = torch.empty(comb_n, dtype=dtype), torch.empty(comb_n, dtype=dtype)
    gram_fns = {
        "cpp": lambda: OPS.gram(grads, offsets),
        "torch:dots": lambda: torch_dots(grads, bounds, wide),
        "torch:stack_mm": lambda: torch_stack_mm(grads, bounds),
        "floor": lambda: gram_dst.copy_(gram_src),
    }
    comb_fns = {
        "cpp": lambda: OPS.combine_many(grads, offsets, coeffs, out),
        "torch:strong": lambda: torch_combine(grads, bounds, coeffs, out, scratch),
        "floor": lambda: comb_dst.copy_(comb_src),
    }
    if k == 2:
        gram_fns["2-obj segment_stats"] = lambda: OPS.segment_stats(grads[0], grads[1], offsets)
        comb_fns["2-obj combine"] = lambda: OPS.combine(grads[0], grads[1], offsets, coeffs, out)
    rows = []
    for op, fns, nbytes in (("gram", gram_fns, k * numel * item), ("combine_many", comb_fns, (k + 1) * numel * item)):
        res = interleaved(fns, "cpu", rounds=rounds, warmup=1)
        best_torch = min(v["min"] for n, v in res.items() if n.startswith("torch:"))
        for name, v in res.items():
            if name == "floor":
                continue
            rows.append((k, str(dtype).removeprefix("torch."), op, name, v["min"] * 1e3, v["median"] * 1e3,
                         nbytes / v["min"] / 1e9, v["min"] / res["floor"]["min"], best_torch / v["min"]))
        rows.append((k, str(dtype).removeprefix("torch."), op, "floor (copy_)", res["floor"]["min"] * 1e3,
                     res["floor"]["median"] * 1e3, nbytes / res["floor"]["min"] / 1e9, 1.0, best_torch / res["floor"]["min"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", default="16M")
    p.add_argument("--segments", type=int, default=64)
    p.add_argument("--ks", default="2,3,4,8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    numel = _size(args.numel)
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical CPUs); op kernels: {cpu_kernels()}; torch {torch.__version__}; "
          f"pareto_lora {pareto_lora.__file__}")
    print(f"uptime before: {uptime()}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\n### {threads} thread{'s' if threads > 1 else ''}, {numel >> 20}M elements x {args.segments} segments\n")
        print("| K | dtype | op | contender | min ms | med ms | GB/s (min bytes) | /floor | x torch |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|")
        for k in [int(x) for x in args.ks.split(",")]:
            for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
                for r in run_case(k, dtype, numel, args.segments, args.rounds):
                    print("| {} | {} | {} | {} | {:.2f} | {:.2f} | {:.1f} | {:.2f} | {:.2f} |".format(*r), flush=True)
                print(f"  ... K={k} {dtype} done, {uptime()}", file=sys.stderr, flush=True)
    print(f"\nuptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

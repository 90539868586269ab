"""Every kernel rule in the fused op, on the CPU: does a rule cost anything beyond the memory pass?

    python bench/bench_rules.py [threads] [rounds] [device] [backend]

(device ``cpu`` by default; on a GPU, e.g. ``1 41 cuda cpp`` or ``1 41 cuda triton``.)

The rules differ only in the per-segment (or per-group) step between the statistics and the
combine, so the op's time should not depend on the rule except where segments are tiny and the
rule runs often. Layouts (float32, ``pareto_lora.integrate(..., backend=backend)``):

* ``16M / 5 groups``: a training step's shape (256 LoRA units of random sizes in 5 groups);
* ``4M / 1024 segments``: one rule per segment of ~4K elements;
* ``1M / 16384 segments``: 64 elements per segment, the rule's share at its largest.

Every rule of ``pareto_lora.RULES`` is timed interleaved in one process (app.benchmarking.interleaved,
the order rotated each round); the table gives the median ms and the median per-round ratio to
``sum`` (whose rule step is trivial) with a distribution-free 95% interval.
"""

import sys

import torch

import pareto_lora
from pareto_lora.app.benchmarking import cpu_model, interleaved, median_ci, uptime

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
backend = sys.argv[4] if len(sys.argv) > 4 else "cpp"
torch.set_num_threads(threads)


def layout(numel: int, segments: int, groups: int | None, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(segments, generator=gen) + 0.2
    sizes = (w / w.sum() * numel).long()
    sizes[-1] += numel - int(sizes.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    cuts = None if groups is None else torch.linspace(0, segments, groups + 1).round().long()
    return offsets, cuts


where = (f"{cpu_model()}, pareto_lora CPU build {pareto_lora._C.cpu_capability()}, {threads} thread(s)"
         if device == "cpu" else torch.cuda.get_device_name(device))
print(f"{where}, backend {backend}, {rounds} interleaved rounds, load {uptime()}")
rules = pareto_lora.RULES
cases = (("16M / 5 groups", 1 << 24, 256, 5), ("4M / 1024 segments", 1 << 22, 1024, None),
         ("1M / 16384 segments", 1 << 20, 16384, None))
print("| rule | " + " | ".join(f"{name}: ms | x sum (95% CI)" for name, *_ in cases) + " |")
print("|---|" + "---:|---:|" * len(cases))
results = {}
for name, numel, segments, groups in cases:
    offsets, cuts = layout(numel, segments, groups, seed=segments)
    gen = torch.Generator().manual_seed(numel)
    a = torch.randn(numel, generator=gen).to(device)
    b = -0.3 * a + torch.randn(numel, generator=gen).to(device)
    out = torch.empty_like(a)
    fns = {r: (lambda r=r: pareto_lora.integrate(a, b, offsets, out=out, rule=r, groups=cuts, backend=backend))
           for r in rules}
    results[name] = interleaved(fns, device=device, rounds=rounds)
for r in rules:
    cells = []
    for name, *_ in cases:
        t = results[name]
        mid, lo, hi = median_ci([x / y for x, y in zip(t[r]["times"], t["sum"]["times"])])
        cells.append(f"{t[r]['median'] * 1e3:.2f} | {mid:.2f} ({lo:.2f}-{hi:.2f})")
    print(f"| `{r}` | " + " | ".join(cells) + " |", flush=True)
print(f"load at the end {uptime()}")

"""The grouped training step on the CPU: one fused op vs the four-step path it replaces.

    python bench/grouped_cpu.py [threads] [rounds]

LoRA-like layouts (U units of random sizes, cut into 3-5 groups of consecutive units), float32
and bf16. Contenders, interleaved in one process (app.benchmarking.interleaved):

* ``fused``: ``pareto_lora.integrate(a, b, unit_offsets, out, groups=groups)``, one op call;
* ``four ops``: ``segment_stats`` per unit, then the Python sum into groups
  (``pareto_lora.flat.sum_into_groups``), ``rule_coefficients`` on the groups, and ``combine``
  with each unit's group coefficients: what ``flat_step`` ran before issue 23.

Prints a markdown table: median ms of each, and the median of the per-round ratios fused/four ops
with a distribution-free 95% confidence interval (order statistics of the paired ratios).
"""

import sys

import torch

import pareto_lora
from pareto_lora.app.benchmarking import interleaved, median_ci
from pareto_lora.flat import sum_into_groups

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 25
torch.set_num_threads(threads)


def layout(numel: int, units: int, groups: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(units, generator=gen) + 0.2
    sizes = (w / w.sum() * numel).long()
    sizes[-1] += numel - int(sizes.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    cuts = torch.linspace(0, units, groups + 1).round().long()
    unit_group = torch.repeat_interleave(torch.arange(groups), cuts[1:] - cuts[:-1])
    return offsets, cuts, unit_group


print(f"{threads} thread(s); {rounds} interleaved rounds; rule pareto_lora")
print("| dtype | elements | units | groups | fused ms | four ops ms | fused / four ops (95% CI) |")
print("|---|---:|---:|---:|---:|---:|---:|")
for dtype in (torch.float32, torch.bfloat16):
    for numel, units, groups in ((1 << 20, 64, 3), (1 << 22, 128, 4), (1 << 24, 256, 5)):
        offsets, cuts, unit_group = layout(numel, units, groups, seed=numel + units)
        gen = torch.Generator().manual_seed(units)
        a = torch.randn(numel, generator=gen).to(dtype)
        b = (-0.3 * a.float() + torch.randn(numel, generator=gen)).to(dtype)
        out = torch.empty_like(a)

        def fused():
            pareto_lora.integrate(a, b, offsets, out=out, groups=cuts, backend="cpp")

        def four_ops():
            stats = pareto_lora.segment_stats(a, b, offsets, backend="cpp")
            group_stats = sum_into_groups(stats, unit_group, groups)
            coeffs, _ = pareto_lora.rule_coefficients(group_stats, backend="cpp")
            pareto_lora.combine(a, b, offsets, coeffs[unit_group], out=out, backend="cpp")

        # Same bits of output from both (the group sums differ only in their order of addition).
        fused()
        ref = out.clone()
        four_ops()
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-5, atol=1e-5)
        t = interleaved({"fused": fused, "four": four_ops}, rounds=rounds)
        ratios = [x / y for x, y in zip(t["fused"]["times"], t["four"]["times"])]
        mid, lo, hi = median_ci(ratios)
        print(f"| {str(dtype)[6:]} | {numel:,} | {units} | {groups} | {t['fused']['median'] * 1e3:.2f} | "
              f"{t['four']['median'] * 1e3:.2f} | {mid:.2f} ({lo:.2f}-{hi:.2f}) |", flush=True)

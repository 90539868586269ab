"""The integration on the training path: ops per step and step time, the fused path against the three-op one.

    python bench/bench_training_path.py                          # small and large Llama, 20 rounds
    python bench/bench_training_path.py --configs small,chameleon --rounds 30

Same models, batches and LoRA configurations as bench/bench_training_step.py (its CONFIGS), one
intra-op thread, contenders interleaved in one process (rotated each round):
  vanilla          forward + (loss_text + loss_image).backward()
  pareto_3op       forward + ParetoLoRA.backward() with the integration of commit 8cacd72 (three ops per
                   bucket: segment_stats -> rule_coefficients -> combine, plus a masked Python group sum);
                   kept callable here only, as the "before" of issue 23
  pareto_fused     forward + ParetoLoRA.backward() as the package runs it now
  integrate_3op, integrate_fused   the integration alone on ready buffers (out= a scratch buffer)
Ops per step: a torch.profiler trace (CPU) of one ParetoLoRA.backward() step per contender,
counting the pareto_lora::* ops, and the top-level dispatcher ops of the integration alone.
Times: min and median over the rounds; the paired per-round ratio pareto_fused / pareto_3op: its mean
with a 95% confidence interval (t, over rounds) and its median (robust to a disturbed round). Numbers only: nothing here asserts a time.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(__file__))

import bench_training_step as bts  # noqa: E402

import pareto_lora  # noqa: E402
from pareto_lora import ops  # noqa: E402
from pareto_lora.flat import FlatStep  # noqa: E402
from pareto_lora.flat import flat_step as fused_flat_step  # noqa: E402

ROWS = ("vanilla", "pareto_3op", "pareto_fused", "integrate_3op", "integrate_fused")


# -- the integration as it ran before issue 23 (commit 8cacd72), for comparison only -----------------
def _sum_into_groups_3op(stats, segment_group, num_groups):
    groups = torch.arange(num_groups, device=stats.device)
    member = (segment_group.to(stats.device)[None, :] == groups[:, None])[:, :, None]
    return torch.where(member, stats[None, :, :], 0).sum(dim=1)


def flat_step_3op(text, image, layout, rule_fn, out=None, poison=None, backend="auto"):
    """stats per bucket -> Python sum into groups -> rule -> combine per bucket (three ops + glue)."""
    out = image if out is None else out
    pairs = [(a, b, bk.unit_offsets) for a, b, bk in zip(text, image, layout.buckets)]
    total = None
    for a, b, offsets in pairs:
        s = ops.segment_stats(a, b, offsets, backend=backend)
        total = (s.clone() if s.dtype == torch.float64 else s.to(torch.float32)) if total is None else total + s
    group_stats = _sum_into_groups_3op(total, layout.unit_group, layout.num_groups)
    coeffs, cases = rule_fn(group_stats)
    unit_coeffs = coeffs[layout.unit_group]
    if poison is not None:
        unit_coeffs = unit_coeffs * torch.where(poison, math.nan, 1.0)
    for (a, b, offsets), o in zip(pairs, out):
        ops.combine(a, b, offsets, unit_coeffs, out=o, backend=backend)
    return FlatStep(total, group_stats, coeffs, cases)


def _kernel_rule(pl):
    return lambda gs: ops.rule_coefficients(gs, pl.spec, active=pl.layout.active, backend=pl.backend)


def _finish_3op(pl):
    sync = pl._sync

    def finish(losses, settle):
        poison = settle(losses, False)
        step = flat_step_3op(sync.text.flats, sync.image.flats, sync.layout, _kernel_rule(pl), poison=poison,
                             backend=sync.backend)
        sync.image.attach_as_grad(sync.layout.params)
        return step

    return finish


def _integrate_fused(pl, out):
    return fused_flat_step(pl.text.flats, pl.image.flats, pl.layout, pl._sync.rule, out=out, backend=pl.backend)


# -----------------------------------------------------------------------------------------------------
def build(config: str):
    arch, *shape = bts.CONFIGS[config]
    model, losses, arch_kwargs = (bts._llama if arch == "llama" else bts._chameleon)(*shape)
    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", num_groups=4, modulate="lower", **arch_kwargs)
    finish_3op = _finish_3op(pl)

    def vanilla():
        lt, li = losses()
        (lt + li).backward()
        model.zero_grad(set_to_none=True)

    def pareto_fused():
        pl.backward(*losses())

    def pareto_3op():
        pl._sync.finish = finish_3op  # an instance attribute: shadows the class's finish for this step only
        try:
            pl.backward(*losses())
        finally:
            del pl._sync.finish

    pareto_fused()
    out = [torch.empty_like(f) for f in pl.image.flats]
    fns = {"vanilla": vanilla, "pareto_3op": pareto_3op, "pareto_fused": pareto_fused,
           "integrate_3op": lambda: flat_step_3op(pl.text.flats, pl.image.flats, pl.layout, _kernel_rule(pl), out=out),
           "integrate_fused": lambda: _integrate_fused(pl, out)}
    return fns, pl


def op_counts(fn) -> tuple[Counter, int]:
    """(pareto_lora::* ops by name, top-level dispatcher ops) of one call of `fn` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    ours = Counter(e.name for e in events if e.name.startswith("pareto_lora::"))
    top = sum(1 for e in events if e.cpu_parent is None and "::" in e.name)
    return ours, top


def paired_ratio_ci(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Mean of the per-round ratios num/den and its 95% confidence interval (t over the rounds)."""
    r = [n / d for n, d in zip(num, den)]
    m, n = statistics.fmean(r), len(r)
    try:
        from scipy.stats import t

        crit = float(t.ppf(0.975, n - 1))
    except ImportError:  # normal approximation
        crit = 1.96
    half = crit * statistics.stdev(r) / math.sqrt(n) if n > 1 else math.inf
    return m, m - half, m + half


def main(argv=None) -> int:
    import argparse
    import datetime

    from pareto_lora.app.benchmarking import cpu_model, interleaved, uptime

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="small,large", help=f"comma-separated from {', '.join(bts.CONFIGS)}")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds per configuration (default 20)")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in bts.CONFIGS]
    if bad or args.rounds < 2:
        p.error(f"--configs: unknown {', '.join(bad)}" if bad else "--rounds: expected at least 2")

    torch.set_num_threads(1)
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical CPUs), build {pareto_lora._C.cpu_capability()}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} intra-op thread")
    print(f"uptime before: {uptime()}")
    for config in configs:
        fns, pl = build(config)
        lay = pl.layout
        print(f"\n## {config}: {bts.CONFIGS[config]} (arch, layers, hidden, batch, seq, r); {len(lay.buckets)} bucket(s), "
              f"{lay.num_units} units, {lay.num_groups} groups, {sum(b.numel for b in lay.buckets):,} gradient elements")
        print("| contender | pareto_lora ops per step | top-level ops of the integration |")
        print("|---|---|---:|")
        for name, step, integ in (("3op", "pareto_3op", "integrate_3op"), ("fused", "pareto_fused", "integrate_fused")):
            ours, _ = op_counts(fns[step])
            _, top = op_counts(fns[integ])
            print(f"| {name} | {', '.join(f'{k} x{v}' for k, v in sorted(ours.items()))} | {top} |")
        timed = interleaved(fns, rounds=args.rounds, warmup=1)
        print("\n| row | min ms | median ms |")
        print("|---|---:|---:|")
        for name in ROWS:
            print(f"| {name} | {timed[name]['min'] * 1e3:.3f} | {timed[name]['median'] * 1e3:.3f} |")
        for num, den in (("pareto_fused", "pareto_3op"), ("pareto_fused", "vanilla"), ("pareto_3op", "vanilla"),
                         ("integrate_fused", "integrate_3op")):
            m, lo, hi = paired_ratio_ci(timed[num]["times"], timed[den]["times"])
            med = statistics.median(a / b for a, b in zip(timed[num]["times"], timed[den]["times"]))
            print(f"{num} / {den}: paired per round, mean {m:.3f} (95% CI {lo:.3f} to {hi:.3f}), median {med:.3f}, "
                  f"{timed[num]['rounds']} rounds")
        print(f"uptime: {uptime()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

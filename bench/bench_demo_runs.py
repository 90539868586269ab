"""What one fine-tuning run of the default ``pareto-lora demo`` costs, per kind of run (issue 25).

    python bench/bench_demo_runs.py                 # 3 rounds, seed 0, interleaved
    python bench/bench_demo_runs.py --rounds 5

The default demo makes 15 runs of 60 steps: vanilla (``sum``) and ``w2`` in one backward of the
weighted loss (``plain_backward="one"``), ``pareto_lora`` in two passes, 5 seeds each. The rows, interleaved in
this one process and one thread (as a demo worker runs them), from the shipped base:
  one_backward   a plain run, one backward of the weighted loss per step (F + B)
  two_pass       the same run through ParetoLoRA's two passes (F + 2B; the demo's --full does this)
  pareto_lora    the paper's rule (F + 2B and the integration)
A 2-core demo's fine-tuning wall time is about (10 x one_backward + 5 x pareto_lora) / 2 plus each
worker's start-up (imports, worlds, base); the ratio one_backward / pareto_lora is what scales the
issue's Zen 1 run time (45 s per two-pass run of 80 steps) to this design. Numbers only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from pareto_lora.app.demo import DEFAULT, DemoConfig
from pareto_lora.app.demo.data import fixed_batches
from pareto_lora.app.demo.experiment import finetune, prepare
from pareto_lora.app.env import machine

ROWS = {"one_backward": ("sum", "one"), "two_pass": ("sum", "two"), "pareto_lora": ("pareto_lora", "one")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    cfg = DemoConfig(**DEFAULT)
    t0 = time.perf_counter()
    setup = prepare(cfg, progress=False)
    print(f"setup (worlds, floors, base: shipped={bool(setup.base_info.get('shipped'))}): {time.perf_counter() - t0:.1f} s")
    eval_set = fixed_batches(setup.ft_world, cfg.eval_batches, cfg.eval_batch_size, seed=20_000 + a.seed)
    times = {name: [] for name in ROWS}
    for _ in range(a.rounds):
        for name, (rule, how) in ROWS.items():
            run = finetune(setup.base, dataclasses.replace(cfg, plain_backward=how), rule, a.seed, setup.ft_world,
                           eval_set, setup.floors)
            times[name].append(run.seconds)
    ref = statistics.median(times["pareto_lora"])
    print(f"{machine()}; torch threads {torch.get_num_threads()}; {a.rounds} rounds, seed {a.seed}")
    print(f"{'run':<14}{'median s':>10}{'min s':>8}{'/ pareto_lora':>15}")
    for name, ts in times.items():
        print(f"{name:<14}{statistics.median(ts):>10.2f}{min(ts):>8.2f}{statistics.median(ts) / ref:>15.2f}")
    one = statistics.median(times["one_backward"])
    print(f"default demo's fine-tuning work: 10 x {one:.2f} + 5 x {ref:.2f} = {10 * one + 5 * ref:.1f} s of run time "
          f"(its 15 runs all in two passes: {10 * statistics.median(times['two_pass']) + 5 * ref:.1f} s)")


if __name__ == "__main__":
    main()

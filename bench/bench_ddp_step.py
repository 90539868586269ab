"""A DDP and an FSDP2 training step under activation checkpointing on CPU: vanilla LoRA vs
ParetoLoRA's two passes vs its one batched traversal (issue 26).

    python bench/bench_ddp_step.py                                 # small and chameleon, DDP and FSDP2, 12 rounds
    python bench/bench_ddp_step.py --configs small --wraps ddp --rounds 6

Launches 2 processes (gloo on loopback, 1 intra-op thread each). Every rank builds the same
configuration of bench/bench_training_step.py three times (same seed; its own batch per rank),
turns on transformers' non-reentrant checkpointing (``gradient_checkpointing_enable(
gradient_checkpointing_kwargs={"use_reentrant": False})``), wraps each copy in
``DistributedDataParallel`` (default buckets) or FSDP2 (``fully_shard`` on each layer, then the
root), and times all contenders in one process, interleaved round by round (order rotated each
round, a barrier before each timed step):
  vanilla   forward + (loss_text + loss_image).backward()   (DDP's / FSDP2's own reduction)
  two_pass  forward + ParetoLoRA(traversal="two_pass").backward()
  batched   forward + ParetoLoRA(traversal="batched").backward()   (what "auto" takes here)
Printed: per contender rank 0's median ms [min-max], and the step / vanilla ratio paired per
round, median [min-max], of each rank. ``bitwise``: after one step on identical copies, the
batched step's .grad equals the two-pass one's on both ranks. Numbers only: nothing asserted.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

ROWS = ("vanilla", "two_pass", "batched")


def build(config: str, rank: int):
    """(checkpointed model, losses(model) -> (text, image), ParetoLoRA kwargs); same weights on every call."""
    import bench_training_step as BT
    import models

    import pareto_lora

    arch, layers, hidden, batch_size, seq, r = BT.CONFIGS[config]
    if arch == "llama":
        model = models.lora_llama(num_layers=layers, hidden=hidden, r=r)
        batch = models.token_batch(batch=batch_size, seq=seq, seed=rank, image_span=(16, 48))
        inputs = models.model_inputs(batch)

        def losses(m):
            out = m(**inputs)
            return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])

        kw = {}
    else:
        model = BT.lora_chameleon(layers, hidden, r)
        batch = BT.chameleon_batch(batch_size, seq, seed=rank)
        spec = pareto_lora.archs.detect_arch(model)

        def losses(m):
            return pareto_lora.archs.modality_losses_for(m, batch, spec)

        kw = {"arch": spec}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), losses, kw


def wrapped(wrap: str, model, mesh):
    """`model` wrapped for data parallelism: DDP (default buckets) or FSDP2 (each layer, then the root)."""
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def rank_main(rank: int, world: int, port: int, configs: list[str], wraps: list[str], rounds: int,
              out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import pareto_lora

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for config in configs:
        fns, checks = {}, {}
        for wrap in wraps:
            models, pls = {}, {}
            for row in ROWS:
                model, losses, kw = build(config, rank)
                models[row] = wrapped(wrap, model, mesh)
                if row != "vanilla":
                    pls[row] = pareto_lora.ParetoLoRA(models[row], rule="pareto_lora", num_groups=4, modulate="lower",
                                                      traversal=row, **kw)

            def vanilla(m=models["vanilla"], losses=losses):
                lt, li = losses(m)
                (lt + li).backward()
                m.zero_grad(set_to_none=True)

            def step(row, models=models, pls=pls, losses=losses):
                return lambda: pls[row].backward(*losses(models[row]))

            fns.update({f"{wrap}/vanilla": vanilla, f"{wrap}/two_pass": step("two_pass"),
                        f"{wrap}/batched": step("batched")})
            fns[f"{wrap}/two_pass"]()
            fns[f"{wrap}/batched"]()  # the same step on identical copies: compare before timing
            grads = {row: [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                           for p in models[row].parameters() if p.requires_grad] for row in ("two_pass", "batched")}
            bitwise = all(torch.equal(a, b) for a, b in zip(grads["two_pass"], grads["batched"]))
            sync = pls["batched"]._sync
            sync.traversal = "auto"  # what "auto" takes on this model: one step with it
            fns[f"{wrap}/batched"]()
            sync.traversal = "batched"
            checks[wrap] = {"bitwise": bitwise, "taken": sync.last_traversal}
            fns[f"{wrap}/vanilla"]()  # warm-up
        names = list(fns)
        times = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                dist.barrier()
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
        result[config] = {"times": times, "checks": checks}
        del fns
    with open(out_path, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def summary(config: str, wrap: str, per_rank: list[dict]) -> str:
    """One Markdown row: rank 0's medians [min-max] in ms, each rank's paired ratio to vanilla."""
    t = per_rank[0][config]["times"]
    ms = lambda row: (f"{statistics.median(t[row]) * 1e3:.1f} [{min(t[row]) * 1e3:.1f}-"  # noqa: E731
                      f"{max(t[row]) * 1e3:.1f}]")
    cells = [ms(f"{wrap}/{row}") for row in ROWS]
    for row in ROWS[1:]:
        parts = []
        for res in per_rank:
            x = res[config]["times"]
            ratios = [a / b for a, b in zip(x[f"{wrap}/{row}"], x[f"{wrap}/vanilla"])]
            parts.append(f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        cells.append(" / ".join(parts))
    bitwise = all(res[config]["checks"][wrap]["bitwise"] for res in per_rank)
    taken = per_rank[0][config]["checks"][wrap]["taken"]
    return f"| {config} | {wrap.upper()} | " + " | ".join(cells) + f" | {'yes' if bitwise else 'no'} ({taken}) |"


def run_ranks(script: str, rank_args, world: int = 2) -> bool:
    """Run `script` once per rank (``--rank r --port p`` plus ``rank_args(r)``), 1 intra-op thread
    each, on a free loopback port; waits for every rank. Returns whether any rank failed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, script, *rank_args(r), "--rank", str(r), "--port", str(port)], env=env)
             for r in range(world)]
    return any([proc.wait() != 0 for proc in procs])  # a list: wait for every rank


def main(argv=None) -> int:
    import argparse

    import bench_training_step as BT

    from pareto_lora.app.benchmarking import cpu_kernels, cpu_model, uptime

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="small,chameleon", help=f"comma-separated from {', '.join(BT.CONFIGS)}")
    p.add_argument("--wraps", default="ddp,fsdp", help="comma-separated from ddp, fsdp (FSDP2 fully_shard)")
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds per configuration (default 12)")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # set on the launched processes
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in BT.CONFIGS]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)}; expected names from {', '.join(BT.CONFIGS)}")
    wraps = [w for w in args.wraps.split(",") if w]
    if not wraps or any(w not in ("ddp", "fsdp") for w in wraps):
        p.error(f"--wraps: expected names from ddp, fsdp, got {args.wraps!r}")
    world = 2
    if args.rank is not None:
        rank_main(args.rank, world, args.port, configs, wraps, args.rounds, args.out)
        return 0
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical CPUs); {world} gloo processes, 1 intra-op thread each")
    print(f"uptime before: {uptime()}; op's CPU build: {cpu_kernels()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        failed = run_ranks(__file__, lambda r: ["--configs", args.configs, "--wraps", args.wraps, "--rounds",
                                                str(args.rounds), "--out", outs[r]], world)
        if failed:
            print("a rank failed", file=sys.stderr)
            return 1
        per_rank = [json.load(open(o)) for o in outs]
    print("| config | wrap | vanilla ms | two_pass ms | batched ms | two_pass / vanilla (rank 0 / rank 1) | "
          "batched / vanilla (rank 0 / rank 1) | bitwise (auto takes) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for config in configs:
        for wrap in wraps:
            print(summary(config, wrap, per_rank))
    print(f"\nms: rank 0's median [min-max] over {args.rounds} interleaved rounds; ratios: step / vanilla paired "
          "per round, median [min-max]")
    print(f"uptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

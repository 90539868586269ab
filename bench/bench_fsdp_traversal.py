"""What FSDP2's one traversal was built from, and what its reduction costs (issue 26 part 1;
pareto_lora.distributed.fsdp_traversal), on 2 gloo processes.

    python bench/bench_fsdp_traversal.py [--config small] [--calls 10]

Prints, for bench_training_step's configuration on FSDP2 (``fully_shard`` on each layer, then the
root, checkpointing on):
  1. what ``autograd.grad`` of the registered (sharded DTensor) parameters says;
  2. whether the unsharded parameters recorded by forward pre-hooks take one batched
     ``autograd.grad`` and FSDP2 still runs a step afterwards;
  3. min and median ms over `--calls` calls (rank 0) of reducing random (text, image) gradients of
     every LoRA parameter to this rank's shards: one ``DTensor.redistribute`` (Partial("avg") ->
     the parameter's placements) per parameter; ``reduce_to_shards`` (one ``reduce_scatter_tensor``);
     and one ``all_reduce`` of them all (a floor), with whether the first two give the same shards.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

from bench_ddp_step import run_ranks  # noqa: E402


def per_parameter(text, image, params):
    """The first reduction tried: a DTensor redistribute per parameter."""
    import torch
    from torch.distributed.tensor import DTensor, Partial, Shard

    out = []
    for a, b, p in zip(text, image, params):
        g = torch.stack([a, b])
        d = DTensor.from_local(g, p.device_mesh, [Partial("avg")], shape=g.shape, stride=g.stride())
        out.append(d.redistribute(p.device_mesh, [Shard(1)]).to_local())
    return out


def timed(fn, calls):
    import statistics

    import torch.distributed as dist

    fn()
    ts = []
    for _ in range(calls):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return f"{min(ts) * 1e3:.1f} / {statistics.median(ts) * 1e3:.1f} ms"


def rank_main(rank: int, port: int, config: str, calls: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import bench_ddp_step as B
    from pareto_lora.distributed.fsdp_traversal import UnshardedCapture, reduce_to_shards
    from pareto_lora.distributed.traversal import batched

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    say = print if rank == 0 else (lambda *a, **k: None)
    mesh = init_device_mesh("cpu", (2,))
    model, losses, _ = B.build(config, rank)
    model = B.wrapped("fsdp", model, mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    capture = UnshardedCapture(model, params)
    lt, li = losses(model)
    try:
        torch.autograd.grad(lt, params, retain_graph=True)
        say("1. autograd.grad of the registered parameters: no error")
    except RuntimeError as e:
        say(f"1. autograd.grad of the registered parameters ({type(params[0]).__name__}): {e}".split("Set allow")[0])
    leaves = capture.leaves(params)
    text, image = batched(lt, li, leaves)
    (lt2, li2) = losses(model)
    (lt2 + li2).backward()
    say(f"2. batched autograd.grad of the {len(leaves)} unsharded {type(leaves[0]).__name__}s: "
        f"{sum(g is not None for g in text)} text and {sum(g is not None for g in image)} image gradients; "
        f"the next FSDP2 step's sharded .grad: {sum(p.grad is not None for p in params)} of {len(params)}")
    gen = torch.Generator().manual_seed(rank)
    text = [torch.randn(p.shape, generator=gen) for p in params]
    image = [torch.randn(p.shape, generator=gen) for p in params]
    group = mesh.get_group(0)
    same = all(torch.equal(x, y) for x, y in zip(per_parameter(text, image, params),
                                                   reduce_to_shards(text, image, params, group)))
    flat = torch.cat([torch.stack([a, b]).reshape(-1) for a, b in zip(text, image)])
    say(f"3. {len(params)} parameters, {sum(p.numel() for p in params):,} elements per objective; min / median of "
        f"{calls} calls, rank 0:")
    say(f"   DTensor redistribute per parameter: {timed(lambda: per_parameter(text, image, params), calls)}")
    say(f"   reduce_to_shards (one reduce_scatter_tensor): {timed(lambda: reduce_to_shards(text, image, params, group), calls)}"
        f"; the same shards: {same}")
    say(f"   one all_reduce of them all: {timed(lambda: dist.all_reduce(flat.clone(), group=group), calls)}")
    dist.destroy_process_group()


def main(argv=None) -> int:
    import argparse

    from pareto_lora.app.benchmarking import cpu_model, uptime

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.port, args.config, args.calls)
        return 0
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {cpu_model()}; "
          f"2 gloo processes, 1 intra-op thread each; uptime before: {uptime()}", flush=True)
    failed = run_ranks(__file__, lambda r: ["--config", args.config, "--calls", str(args.calls)])
    print(f"uptime after: {uptime()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

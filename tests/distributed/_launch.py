"""Launch `world` worker processes on loopback and collect what each saved (shared by the gloo tests)."""

import socket
import subprocess
import sys

import torch


def shut_down(ok: bool) -> None:
    """End a worker's process group: when every scenario ran (`ok`), the ranks meet first; then what
    still holds the group (a DDP reducer, gloo work in flight) is collected; then it is destroyed. A
    rank that tears down while the other still talks to it, or a reducer freed after the group, can
    abort the process at exit ("terminate called without an active exception": once in CI, under load)."""
    import gc

    import torch.distributed as dist

    if ok:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def fully_shard_model(model, layers=None):
    """FSDP2 as the gloo tests apply it: ``fully_shard`` on each decoder layer (`layers`, default the
    stack ``archs.detect_arch`` finds), then on the root, over every rank of the default group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pareto_lora import archs

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.get_submodule(archs.detect_arch(model).layers_path) if layers is None else layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, world: int, out_dir, timeout_s: float, args_of, env_of) -> list:
    """Start ``python worker *args_of(rank)`` with ``env_of(rank)`` for every rank, wait (killing
    stragglers), fail with the rank's log tail if one failed, and load ``out_dir/rank{r}.pt``."""
    procs = [
        subprocess.Popen([sys.executable, worker, *args_of(r)], env=env_of(r), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed (rc={p.returncode}):\n{log[-6000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]

"""One rank of tests/distributed/test_traversal_ddp.py: DDP with non-reentrant activation checkpointing.

    python tests/distributed/_traversal_worker.py RANK WORLD PORT OUT_DIR

Under DDP the image gradient must go through an ordinary backward (the communication hook sees
nothing else), so ParetoLoRA takes two passes there whatever the checkpointing; this rank saves
its integrated gradients and what a batched traversal request raised.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _dist_worker.py, models.py

import _dist_worker as W  # noqa: E402
import pareto_lora  # noqa: E402


def checkpointed_model():
    model = W.models.lora_llama(num_layers=W.NUM_LAYERS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                           timeout=datetime.timedelta(seconds=120))
    out = {}
    ddp = DDP(checkpointed_model(), bucket_cap_mb=W.BUCKET_MB)
    try:
        pareto_lora.ParetoLoRA(ddp, num_groups=W.NUM_GROUPS, modulate="all", traversal="batched")
    except ValueError as e:
        out["batched_error"] = str(e)
    pl = W.pareto(ddp)  # traversal="auto": two passes under DDP
    for step in range(2):  # initial and rebuilt buckets
        report = pl.backward(*W.losses_of(ddp, W.batch_for(rank, 100 * step)))
        out[f"step{step}"] = W.grads_of(ddp.module)
        out[f"step{step}/cases"] = report.cases
        ddp.module.zero_grad(set_to_none=True)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

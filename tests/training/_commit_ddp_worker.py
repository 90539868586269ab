"""One rank of the 2-process CPU/gloo CoMMIT run behind tests/training/test_commit_ddp.py.

    python tests/training/_commit_ddp_worker.py RANK WORLD PORT OUT_DIR

A DDP model with an LLM side and a feature side, one CoMMIT over its optimizer, each rank with its
own batches; saves the kappas, the learning rates and the parameters after every step.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pareto_lora.training.schedulers import CoMMIT

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed"))
from _launch import shut_down  # noqa: E402


class Stacked(nn.Module):
    """logits = llm(tanh(feature(x))): a feature encoder under an LLM head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feature, self.llm = nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.llm(torch.tanh(self.feature(x)))


def steps(rank: int) -> dict:
    """Four CoMMIT steps on this rank's batches (the DDP model is freed when this returns)."""
    model = DDP(Stacked())
    inner = model.module
    opt = torch.optim.SGD([{"params": inner.llm.parameters()}, {"params": inner.feature.parameters()}], lr=0.5)
    sched = CoMMIT(opt, llm_group=0, feature_group=1, window=3)
    out = {"kappa": [], "lrs": [], "params": []}
    for step in range(4):
        gen = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
        # rank 1's inputs are 20x larger: its own kappa would differ by orders of magnitude
        x = torch.randn(16, 6, generator=gen) * (1.0 if rank == 0 else 20.0)
        y = torch.randint(0, 5, (16,), generator=gen)
        logits = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        out["kappa"].append(sched.step(forward=lambda: inner(x), logits=logits))
        opt.zero_grad()
        out["lrs"].append([g["lr"] for g in opt.param_groups])
        out["params"].append([p.detach().clone() for p in inner.parameters()])
    return out


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.save(steps(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    shut_down(True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

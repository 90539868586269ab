"""How DDP cuts ParetoLoRA's LoRA gradients into buckets, and how many groups one fused launch integrates.

    python bench/ddp_bucket_layout.py

One gloo process (world size 1: the bucket layout does not depend on the world size), the two
Llama configurations of bench/bench_training_step.py, 4 groups, DDP's default bucket caps and
bucket_cap_mb=25; two steps, so the layout read is the one DDP re-bucketed after step 1.
Counts only, nothing timed.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import models  # noqa: E402

import pareto_lora  # noqa: E402

CONFIGS = {"small": (8, 128, 16), "large": (8, 512, 32)}  # layers, hidden, r (bench_training_step)


def layout_row(name: str, layers: int, hidden: int, r: int, cap) -> str:
    ddp = DDP(models.lora_llama(num_layers=layers, hidden=hidden, r=r), **({} if cap is None else {"bucket_cap_mb": cap}))
    pl = pareto_lora.ParetoLoRA(ddp, num_groups=4, modulate="lower")
    batch = models.token_batch(batch=2, seq=32, image_span=(8, 24))
    for _ in range(2):
        pl._sync._plans.clear()  # keep only the plans of the last step's buckets
        out = ddp(**models.model_inputs(batch))
        pl.backward(*pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"]))
    plans = list(pl._sync._plans.values())
    mib = sum(b.numel * b.dtype.itemsize for b in pl.layout.buckets) / 2**20
    whole = sorted({g for p in plans if p.whole for g in p.groups})
    return (f"| {name} ({layers}, {hidden}, r {r}) | {mib:.2f} MiB | {cap or 'default'} | {len(plans)} | "
            f"{sum(p.whole for p in plans)} | {len(whole)} of {pl.layout.num_groups} |")


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.set_num_threads(1)
    print(f"command: python {' '.join(sys.argv)}; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
          f"torch {torch.__version__}")
    print("| config | LoRA gradients | bucket_cap_mb | buckets | whole buckets | groups integrated by one fused launch |")
    print("|---|---|---|---:|---:|---:|")
    try:
        for name, shape in CONFIGS.items():
            for cap in (None, 25):
                print(layout_row(name, *shape, cap), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

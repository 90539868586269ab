#!/usr/bin/env python
"""One-process NCCL checks on a GPU (issue 16): a DDP step and an FSDP2 step with ParetoLoRA on a
small bf16 LoRA Llama, each compared with the same step on the bare model (one process, no
wrapper). The gloo tests cover several processes on CPU; this checks the NCCL/CUDA code paths
(hook futures on CUDA streams, DTensor shards on the GPU). Prints one line per check and writes
$OUT/nccl_smoke.json; exits non-zero if a check fails.

    OUT=/tmp/out python tools/device_nccl_smoke.py
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import models  # noqa: E402

import pareto_lora  # noqa: E402

RULES = ("pareto_lora", "mmpareto")


def losses(model, batch):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits.float(), batch["labels"], image_token_mask=batch["image_token_mask"])


def fresh(dev):
    return models.lora_llama(num_layers=4, hidden=64, r=8).to(dev, torch.bfloat16)


def grads_of(model):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad
            out[n.replace("module.", "")] = (g.full_tensor() if hasattr(g, "full_tensor") else g).float().cpu()
    return out


def compare(want, got):
    worst = 0.0
    for n, w in want.items():
        g = got[n]
        worst = max(worst, float((g - w).abs().max() / (w.abs().max() + 1e-12)))
    return worst


def main() -> int:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    # PL_SMOKE_CPU=1: the same checks over gloo on the CPU (to try the script without a GPU).
    cpu = os.environ.get("PL_SMOKE_CPU") == "1"
    dist.init_process_group("gloo" if cpu else "nccl", rank=0, world_size=1)
    dev = torch.device("cpu") if cpu else torch.device("cuda", 0)
    if not cpu:
        torch.cuda.set_device(dev)
    batch = {k: v.to(dev) for k, v in models.token_batch(batch=4, seq=32, seed=1).items()}
    report, ok = {}, True
    for rule in RULES:
        bare = fresh(dev)
        pl = pareto_lora.ParetoLoRA(bare, rule=rule, num_groups=2, modulate="all")
        pl.backward(*losses(bare, batch))
        want = grads_of(bare)
        for kind in ("ddp", "fsdp2"):
            name = f"{kind}/{rule}"
            try:
                model = fresh(dev)
                if kind == "ddp":
                    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if cpu else [0])
                else:
                    from torch.distributed.fsdp import fully_shard

                    for layer in model.get_base_model().model.layers:
                        fully_shard(layer)
                    fully_shard(model)
                    wrapped = model
                pw = pareto_lora.ParetoLoRA(wrapped, rule=rule, num_groups=2, modulate="all")
                for _ in range(2):  # DDP's second step runs on rebuilt buckets
                    report_step = pw.backward(*losses(wrapped, batch))
                if not cpu:
                    torch.cuda.synchronize()
                err = compare(want, grads_of(wrapped))
                passed = err < 2e-2 and not report_step.nonfinite
                report[name] = {"max_rel_err_vs_bare": err, "cases": report_step.cases, "passed": passed}
            except Exception as e:  # noqa: BLE001 - every check reports, the next one still runs
                report[name] = {"passed": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            ok &= report[name]["passed"]
            print(name, json.dumps({k: v for k, v in report[name].items() if k != "trace"}), flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "nccl_smoke.json"), "w") as f:
        json.dump(report, f, indent=1)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""What a MIMO step costs next to a vanilla LoRA step (one training step of a small LoRA Llama).

    python bench/bench_mimo_one_backward.py [--rounds 30] [--device cpu|cuda] [--layers 8 --hidden 128]

Contenders (same model, batch, LoRA config; each step = forward + losses + backward/integration +
AdamW step + zero_grad), run *interleaved*: every round runs each contender once, in a shuffled
order, so drifting machine load hits all of them alike:

  vanilla          (loss_text + loss_image).backward()                     one backward
  mimo             ParetoLoRA(rule="mimo"): one backward of a*L_text + b*L_image (weights from the losses)
  sum_two_grads    ParetoLoRA(rule="sum"): text and image gradients separately, then the flat step
  mimo_per_group   ParetoLoRA(rule=MIMO(per_group=True)): the two-gradient path with MIMO's weights

Prints the median and quartiles per contender (ms) and the median ratio to vanilla. Numbers, not
asserts: run it where you want to know. Each contender trains its own copy of the model.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import models  # noqa: E402

import pareto_lora  # noqa: E402
from pareto_lora.training.balancers import MIMO  # noqa: E402


def make_contenders(base, batch, device):
    inputs = {k: v.to(device) for k, v in models.model_inputs(batch).items()}
    labels, mask = batch["labels"].to(device), batch["image_token_mask"].to(device)

    def build(kind):
        model = copy.deepcopy(base).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        pl = None
        if kind == "mimo":
            pl = pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=4)
        elif kind == "sum_two_grads":
            pl = pareto_lora.ParetoLoRA(model, rule="sum", num_groups=4)
        elif kind == "mimo_per_group":
            pl = pareto_lora.ParetoLoRA(model, rule=MIMO(per_group=True), num_groups=4, modulate="all")

        def step():
            out = model(**inputs)
            lt, li = pareto_lora.modality_losses(out.logits, labels, image_token_mask=mask)
            if pl is None:
                (lt + li).backward()
            else:
                pl.backward(text=lt, image=li)
            opt.step()
            opt.zero_grad()

        return step

    return {k: build(k) for k in ("vanilla", "mimo", "sum_two_grads", "mimo_per_group")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: robust on a shared box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base = models.lora_llama(num_layers=args.layers, hidden=args.hidden, r=args.rank)
    batch = models.token_batch(batch=args.batch, seq=args.seq, image_span=(args.seq // 4, 3 * args.seq // 4))
    steps = make_contenders(base, batch, dev)
    times: dict[str, list[float]] = {k: [] for k in steps}
    rng = random.Random(0)
    for r in range(args.warmup + args.rounds):
        order = list(steps)
        rng.shuffle(order)
        for name in order:
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, layers {args.layers}, "
          f"hidden {args.hidden}, batch {args.batch}x{args.seq}, LoRA r {args.rank}; {args.rounds} interleaved rounds; "
          f"load average {load[0]:.2f}" if load[0] != "?" else "")
    van = statistics.median(times["vanilla"])
    print(f"{'contender':<16} {'median ms':>10} {'q1 ms':>9} {'q3 ms':>9} {'vs vanilla':>11}")
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4)
        print(f"{name:<16} {1e3 * statistics.median(ts):>10.2f} {1e3 * q1:>9.2f} {1e3 * q3:>9.2f} "
              f"{statistics.median(ts) / van:>10.2f}x")
    # paired per-round ratio (same round, adjacent in time): robust to load drift
    pairs = [m / v for m, v in zip(times["mimo"], times["vanilla"])]
    print(f"paired median mimo/vanilla per round: {statistics.median(pairs):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

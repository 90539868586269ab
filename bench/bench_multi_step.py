"""What a K-objective LoRA step costs on CPU (issue 29): K = 3 against vanilla LoRA and the FLOP floor.

    python bench/bench_multi_step.py                    # both configurations, interleaved, a table
    python bench/bench_multi_step.py --configs chameleon --rounds 12

Configurations (bench/bench_training_step.py's; random weights from a config, nothing downloaded):
  small      LoRA Llama, 8 layers, hidden 128, r = 16; objectives: the text loss of the batch's first
             two sequences, of its last two, and the image loss (modality_losses)
  chameleon  LoRA Chameleon, 8 layers, hidden 512, r = 32; objectives: pareto_lora.archs.OBJECTIVES
             (text, understanding = text after an image input, generation), objective_losses_for
Rows (same model, batch and LoRA config):
  forward      the forward pass and the K losses
  vanilla      forward + (sum of the K losses).backward()             (one backward)
  k_grads      forward + K torch.autograd.grad passes                  (the K-objective step minus integration)
  k_step       forward + ParetoLoRA(objectives=..., rule).backward()   (the full step, rule "mean" and "upgrad")
  two_step     forward + the two-objective ParetoLoRA step (text = the two text-like losses summed)
FLOP floor: a backward costs B = vanilla - forward, so K objectives cost at least forward + K B;
`k_step / vanilla (floor)` puts the measured ratio beside (forward + K B) / vanilla. Numbers only.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import bench_training_step as bts  # noqa: E402
import models  # noqa: E402

import pareto_lora  # noqa: E402

CONFIGS = ("small", "chameleon")


def _small():
    _, layers, hidden, batch_size, seq, rank = bts.CONFIGS["small"]
    model = models.lora_llama(num_layers=layers, hidden=hidden, r=rank).train()
    batch = models.token_batch(batch=batch_size, seq=seq, image_span=(16, 48))
    inputs = models.model_inputs(batch)
    half = batch_size // 2

    def losses():
        logits = model(**inputs).logits
        out = {}
        for name, rows in (("text_first", slice(0, half)), ("text_second", slice(half, None))):
            out[name] = pareto_lora.modality_losses(logits[rows], batch["labels"][rows],
                                                    image_token_mask=batch["image_token_mask"][rows])[0]
        out["image"] = pareto_lora.modality_losses(logits, batch["labels"],
                                                   image_token_mask=batch["image_token_mask"])[1]
        return out

    return model, losses, ("text_first", "text_second", "image"), {}


def _chameleon():
    _, layers, hidden, batch_size, seq, rank = bts.CONFIGS["chameleon"]
    model = bts.lora_chameleon(layers, hidden, rank).train()
    batch = bts.chameleon_batch(batch_size, seq)
    spec = pareto_lora.archs.detect_arch(model)

    def losses():
        return pareto_lora.archs.objective_losses_for(model, batch, spec)

    return model, losses, pareto_lora.archs.OBJECTIVES, {"arch": spec}


def build(config: str):
    model, losses, objectives, kw = (_small if config == "small" else _chameleon)()
    params = [p for p in model.parameters() if p.requires_grad]

    def forward():
        with torch.enable_grad():
            losses()

    def vanilla():
        sum(losses().values()).backward()
        model.zero_grad(set_to_none=True)

    def k_grads():
        ls = list(losses().values())
        for i, loss in enumerate(ls):
            torch.autograd.grad(loss, params, retain_graph=i < len(ls) - 1)

    steps = {rule: pareto_lora.ParetoLoRA(model, rule=rule, num_groups=4, modulate="all", objectives=objectives, **kw)
             for rule in ("mean", "upgrad")}
    two = pareto_lora.ParetoLoRA(model, rule="pareto_lora", num_groups=4, modulate="lower", **kw)

    def k_step(rule):
        return lambda: steps[rule].backward(**losses())

    def two_step():
        ls = list(losses().values())
        two.backward(text=sum(ls[:-1]), image=ls[-1])

    fns = {"forward": forward, "vanilla": vanilla, "k_grads": k_grads, "k_step_mean": k_step("mean"),
           "k_step_upgrad": k_step("upgrad"), "two_step": two_step}
    return fns, sum(p.numel() for p in params), len(objectives), steps["mean"].backend


def main(argv=None) -> int:
    import argparse
    import datetime

    from pareto_lora.app.benchmarking import cpu_kernels, cpu_model, interleaved, uptime

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated from {', '.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds per configuration (default 12)")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)}; expected names from {', '.join(CONFIGS)}")
    torch.set_num_threads(1)
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical CPUs); torch {torch.__version__}; 1 intra-op thread; op's CPU build: {cpu_kernels()}")
    print(f"uptime before: {uptime()}")
    print("| config | K | LoRA params | backend | forward | vanilla | k_grads | k_step mean | k_step upgrad | two_step | "
          "B | k_step mean / vanilla (floor) | integration share (mean) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in configs:
        fns, nparams, k, backend = build(config)
        t = {name: v["min"] * 1e3 for name, v in interleaved(fns, rounds=args.rounds, warmup=1).items()}
        bwd = t["vanilla"] - t["forward"]
        floor = (t["forward"] + k * bwd) / t["vanilla"]
        share = (t["k_step_mean"] - t["k_grads"]) / t["k_step_mean"]
        print(f"| {config} | {k} | {nparams:,} | {backend} | {t['forward']:.1f} | {t['vanilla']:.1f} | {t['k_grads']:.1f} | "
              f"{t['k_step_mean']:.1f} | {t['k_step_upgrad']:.1f} | {t['two_step']:.1f} | {bwd:.1f} | "
              f"{t['k_step_mean'] / t['vanilla']:.2f} ({floor:.2f}) | {share:.1%} |", flush=True)
    print("\ntimes: min ms over interleaved rounds")
    print(f"uptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

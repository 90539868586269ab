"""One training step of a LoRA Llama on CPU: vanilla LoRA vs Pareto LoRA, and the FLOP floor.

    python bench/bench_training_step.py                  # both configurations, interleaved, a table
    pytest bench/bench_training_step.py --benchmark-columns=min,median,rounds

Configurations (LoRA on all linear layers, batch 4 x 64 tokens with an image-token span):
  small   8 layers, hidden 128, r = 16
  large   8 layers, hidden 512, r = 32
Rows (same model, batch and LoRA config):
  forward          the forward pass and both modality losses
  vanilla          forward + (loss_text + loss_image).backward()       (one loss, one backward)
  two_backward     forward + autograd.grad(text) + image.backward()     (Pareto LoRA minus integration)
  pareto_step      forward + ParetoLoRA.backward()                      (the full step)
  integrate_only   the integration on ready buffers (stats -> rule -> combine over all LoRA params)
FLOP floor of the second backward: a backward costs B = vanilla - forward, so two objectives cost
at least forward + 2B; `2nd bwd / B` = (two_backward - vanilla) / B is 1.0 at that floor.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import models  # noqa: E402

import pareto_lora  # noqa: E402
from pareto_lora.flat import flat_step  # noqa: E402

# name: (layers, hidden, batch, seq, rank)
CONFIGS = {"small": (8, 128, 4, 64, 16), "large": (8, 512, 4, 64, 32)}


def build(config: str):
    """Step functions of one configuration: {row name: zero-argument callable}."""
    layers, hidden, batch_size, seq, rank = CONFIGS[config]
    model = models.lora_llama(num_layers=layers, hidden=hidden, r=rank).train()
    batch = models.token_batch(batch=batch_size, seq=seq, image_span=(16, 48))
    inputs = models.model_inputs(batch)
    params = [p for p in model.parameters() if p.requires_grad]

    def losses():
        out = model(**inputs)
        return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])

    def forward():
        with torch.enable_grad():
            losses()

    def vanilla():
        lt, li = losses()
        (lt + li).backward()
        model.zero_grad(set_to_none=True)

    def two_backward():
        lt, li = losses()
        torch.autograd.grad(lt, params, retain_graph=True)
        li.backward()
        model.zero_grad(set_to_none=True)

    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", num_groups=4, modulate="lower")

    def pareto_step():
        pl.backward(*losses())

    pareto_step()
    out = [torch.empty_like(f) for f in pl.image.flats]

    def integrate_only():
        flat_step(pl.text.flats, pl.image.flats, pl.layout, pl._rule, out=out)

    fns = {"forward": forward, "vanilla": vanilla, "two_backward": two_backward, "pareto_step": pareto_step,
           "integrate_only": integrate_only}
    return fns, sum(p.numel() for p in params)


@pytest.fixture(scope="module", params=list(CONFIGS))
def steps(request):
    # One intra-op thread: on a shared 2-core box, OpenMP threads spinning against another
    # process's load made single steps 100x slower at random, swamping the differences measured.
    torch.set_num_threads(1)
    return build(request.param)[0]


@pytest.mark.parametrize("row", ["forward", "vanilla", "two_backward", "pareto_step", "integrate_only"])
def test_step(benchmark, steps, row):
    benchmark(steps[row])


def main() -> int:
    import datetime
    import subprocess

    from pareto_lora.app.benchmarking import interleaved

    torch.set_num_threads(1)
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}; "
          f"1 thread; uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("| config | LoRA params | forward | vanilla | two_backward | pareto_step | integrate_only | B = backward | "
          "2nd bwd / B | pareto / vanilla (floor) | integration share of step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in CONFIGS:
        fns, nparams = build(config)
        rounds = 12 if config == "small" else 6
        t = {k: v["min"] * 1e3 for k, v in interleaved(fns, rounds=rounds, warmup=1).items()}
        bwd = t["vanilla"] - t["forward"]
        floor = (t["forward"] + 2 * bwd) / t["vanilla"]
        print(f"| {config} {CONFIGS[config]} | {nparams:,} | {t['forward']:.2f} | {t['vanilla']:.2f} | "
              f"{t['two_backward']:.2f} | {t['pareto_step']:.2f} | {t['integrate_only']:.3f} | {bwd:.2f} | "
              f"{(t['two_backward'] - t['vanilla']) / bwd:.2f} | {t['pareto_step'] / t['vanilla']:.2f} ({floor:.2f}) | "
              f"{t['integrate_only'] / t['pareto_step']:.2%} |", flush=True)
    print("times: min ms over interleaved rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())

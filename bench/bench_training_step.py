"""One training step of a small LoRA Llama on CPU: vanilla LoRA vs Pareto LoRA.

    pytest bench/bench_training_step.py --benchmark-columns=mean,stddev,rounds

Rows (same model, batch and LoRA config):
  vanilla          forward + (loss_text + loss_image).backward()       (one loss, one backward)
  two_backward     forward + autograd.grad(text) + image.backward()     (Pareto LoRA minus integration)
  pareto_step      forward + ParetoLoRA.backward()                      (the full step)
  integrate_only   the integration on ready buffers (stats -> rule -> combine over all LoRA params)
Overhead of Pareto LoRA = pareto_step - vanilla = (two_backward - vanilla) [second backward]
+ integrate_only [integration].
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import models  # noqa: E402

import pareto_lora  # noqa: E402
from pareto_lora.flat import flat_step  # noqa: E402

LAYERS, HIDDEN, BATCH, SEQ, RANK = 8, 128, 4, 64, 16


@pytest.fixture(scope="module")
def setup():
    # One intra-op thread: on a shared 2-core box, OpenMP threads spinning against another
    # process's load made single steps 100x slower at random, swamping the differences measured.
    torch.set_num_threads(1)
    model = models.lora_llama(num_layers=LAYERS, hidden=HIDDEN, r=RANK).train()
    batch = models.token_batch(batch=BATCH, seq=SEQ, image_span=(16, 48))
    inputs = models.model_inputs(batch)

    def losses():
        out = model(**inputs)
        return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])

    return model, losses


def test_vanilla(benchmark, setup):
    model, losses = setup

    def step():
        lt, li = losses()
        (lt + li).backward()
        model.zero_grad(set_to_none=True)

    benchmark(step)


def test_two_backward(benchmark, setup):
    model, losses = setup
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        lt, li = losses()
        torch.autograd.grad(lt, params, retain_graph=True)
        li.backward()
        model.zero_grad(set_to_none=True)

    benchmark(step)


def test_pareto_step(benchmark, setup):
    model, losses = setup
    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", num_groups=4, modulate="lower")

    def step():
        pl.backward(*losses())

    benchmark(step)


def test_integrate_only(benchmark, setup):
    model, losses = setup
    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", num_groups=4, modulate="lower")
    pl.backward(*losses())
    out = [torch.empty_like(f) for f in pl.image.flats]
    benchmark.extra_info["lora_numel"] = sum(f.numel() for f in out)
    benchmark(lambda: flat_step(pl.text.flats, pl.image.flats, pl.layout, pl._rule, out=out))

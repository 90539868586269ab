"""The expected result of a ParetoLoRA step on an architecture: plain autograd + reference.integrate.

Groups come from the ArchSpec alone (the layer index under ``spec.layers_path`` split like
``numpy.array_split``; ``spec.extra_groups`` outside the stack), independently of ParetoLoRA's
own grouping. Shared by tests/archs and the 2-process tests in tests/distributed.
"""

from __future__ import annotations

import numpy as np
import torch

from _oracle import oracle  # noqa: F401  (the grouped float64 oracle, re-exported for these tests)
from pareto_lora import archs


def spec_group(spec, name: str, num_groups: int) -> str:
    layer = spec.layer_of(name)
    if layer is not None:
        split = np.array_split(np.arange(spec.num_layers), num_groups)
        return f"group{next(g for g, layers in enumerate(split) if layer in layers)}"
    return spec.group_of(name) or "outside"


def plain_grads(model, batch, spec):
    """name -> (g_text, g_image) by ordinary autograd (zeros for parameters a loss does not reach)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    text, image = archs.modality_losses_for(model, batch, spec)
    gt = torch.autograd.grad(text, params, retain_graph=True, allow_unused=True)
    gi = torch.autograd.grad(image, params, allow_unused=True)
    zero = torch.zeros_like
    return {n: (zero(p) if a is None else a, zero(p) if b is None else b) for (n, p), a, b in zip(named, gt, gi)}

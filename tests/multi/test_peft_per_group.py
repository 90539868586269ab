"""Issue 29's done-criterion on a real model: the K-objective step on a tiny LoRA Llama, one layer per
group, gives in every group torchjd's aggregate of that group's K-row Jacobian (plain autograd).

Three objectives from one forward: the text loss of the batch's first sequence, the text loss of its
second, and the image loss. Losses are scaled so that every group's Gram trace is above torchjd's
absolute thresholds (a documented difference, docs/rules.md). Tolerance: the float32 model's gradients
(2e-5 relative) plus the solver tolerance each rule's random-Gram test states (tests/multi/test_weightings.py).
"""

import re

import pytest
import torch
from torchjd.aggregation import (ConFIG, DualProjWeighting, IMTLGWeighting, MeanWeighting, UPGradWeighting,
                                 AlignedMTLWeighting)

from torchjd.linalg import QuadprogProjector

import pareto_lora

OBJECTIVES = ("text_first", "text_second", "image")


@pytest.fixture(scope="module")
def llama():
    import models

    return models.lora_llama(num_layers=3)


def _losses(model, batch):
    import models

    logits = model(**models.model_inputs(batch)).logits
    out = {}
    for row, name in ((0, "text_first"), (1, "text_second")):
        lt, _ = pareto_lora.modality_losses(logits[row:row + 1], batch["labels"][row:row + 1],
                                            image_token_mask=batch["image_token_mask"][row:row + 1])
        out[name] = 100.0 * lt
    _, li = pareto_lora.modality_losses(logits, batch["labels"], image_token_mask=batch["image_token_mask"])
    out["image"] = 300.0 * li
    return out


def _torchjd(rule, jac):
    if rule == "config":
        return ConFIG()(jac)
    make = {"mean": MeanWeighting, "imtl_g": IMTLGWeighting, "aligned_mtl": AlignedMTLWeighting,
            "upgrad": lambda: UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-4)),
            "dualproj": lambda: DualProjWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-4))}
    weighting = make[rule]()
    return weighting(jac @ jac.T) @ jac


@pytest.mark.parametrize("rule", ["mean", "upgrad", "dualproj", "imtl_g", "aligned_mtl", "config"])
def test_k3_step_per_group_equals_torchjd(llama, rule):
    import models

    batch = models.token_batch(seed=5)
    named = [(n, p) for n, p in llama.named_parameters() if p.requires_grad]
    losses = _losses(llama, batch)
    per_objective = [torch.autograd.grad(losses[o], [p for _, p in named], retain_graph=o != OBJECTIVES[-1])
                     for o in OBJECTIVES]
    layer = {n: int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n, _ in named}
    pl = pareto_lora.ParetoLoRA(llama, rule=rule, num_groups=3, modulate="all", objectives=OBJECTIVES)
    report = pl.backward(**_losses(llama, batch))
    for g in range(3):
        idx = [i for i, (n, _) in enumerate(named) if layer[n] == g]
        jac = torch.stack([torch.cat([grads[i].reshape(-1) for i in idx]).double() for grads in per_objective])
        got = torch.cat([named[i][1].grad.reshape(-1) for i in idx]).double()
        want = _torchjd(rule, jac)
        scale = float(jac.norm(dim=1).sum())
        assert float((got - want).norm()) <= 2e-5 * scale, (rule, g)
        assert report.cases[g] in (int(pareto_lora.Case.WEIGHTED), int(pareto_lora.Case.PARETO))
    llama.zero_grad(set_to_none=True)

"""Held-out evaluation of a demo model: losses, excess over the exact floors, image cell accuracy.
"""

from __future__ import annotations

import torch

import pareto_lora

from .data import World
from .floors import Floors, image_cell_accuracy
from .model import logits_of

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, batches, device, world: World, floors: Floors) -> dict[str, float]:
    """Token-weighted held-out text/image cross-entropy over `batches`, their excess over
    `floors` (0 = Bayes-optimal) and the image cell accuracy (floors.image_cell_accuracy)."""
    was_training = model.training
    model.eval()
    sums, counts, right, cells = [0.0, 0.0], [0, 0], 0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = logits_of(model, batch.model_inputs())
        losses = pareto_lora.modality_losses(logits, batch.labels, image_token_mask=batch.image_token_mask)
        n = pareto_lora.modality_token_counts(batch.labels, image_token_mask=batch.image_token_mask)
        for i in range(2):
            sums[i] += float(losses[i]) * int(n[i])
            counts[i] += int(n[i])
        r, c = image_cell_accuracy(world, batch, logits)
        right, cells = right + r, cells + c
    model.train(was_training)
    text, image = sums[0] / max(counts[0], 1), sums[1] / max(counts[1], 1)
    return {"text": text, "image": image, "text_excess": text - floors.text, "image_excess": image - floors.image,
            "cell_acc": right / max(cells, 1)}

"""Held-out evaluation of a demo model: losses, excess over the exact floors, image cell accuracy.
"""

from __future__ import annotations

import torch

import pareto_lora

from .data import World
from .floors import Floors, image_cell_accuracy
from .model import logits_of

__all__ = ["evaluate", "held_out"]


@torch.no_grad()
def held_out(model, batches, device, count) -> tuple[float, float, int, int]:
    """Token-weighted held-out (text, image) cross-entropy over `batches`, and the summed
    ``count(batch, logits) -> (hits, total)`` of a metric computed on the same forward (both
    worlds of the demo evaluate this way); the model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    sums, counts, hits, total = [0.0, 0.0], [0, 0], 0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            logits = logits_of(model, batch.model_inputs())
            losses = pareto_lora.modality_losses(logits, batch.labels, image_token_mask=batch.image_token_mask)
            n = pareto_lora.modality_token_counts(batch.labels, image_token_mask=batch.image_token_mask)
            for i in range(2):
                sums[i] += float(losses[i]) * int(n[i])
                counts[i] += int(n[i])
            h, t = count(batch, logits)
            hits, total = hits + h, total + t
    finally:
        model.train(was_training)
    return sums[0] / max(counts[0], 1), sums[1] / max(counts[1], 1), hits, total


def evaluate(model, batches, device, world: World, floors: Floors) -> dict[str, float]:
    """Token-weighted held-out text/image cross-entropy over `batches`, their excess over
    `floors` (0 = Bayes-optimal) and the image cell accuracy (floors.image_cell_accuracy)."""
    text, image, right, cells = held_out(model, batches, device, lambda b, logits: image_cell_accuracy(world, b, logits))
    return {"text": text, "image": image, "text_excess": text - floors.text, "image_excess": image - floors.image,
            "cell_acc": right / max(cells, 1)}

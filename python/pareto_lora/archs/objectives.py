"""One call from a model and a mixed batch to its K = 3 losses: :func:`objective_losses_for`.

The two-objective split (:func:`~pareto_lora.archs.modality_losses_for`) puts every text target
in one loss. A unified model trained on a mixture does three different things with text and
images, and this splits the text loss by what the target is conditioned on:

* ``"text"``: text targets that see no image input (pure language modelling, prompts, text
  after a generated image);
* ``"understanding"``: text targets after an image *input* in their sequence (Janus image
  understanding; Chameleon/Emu3 captioning / visual question answering);
* ``"generation"``: image targets, exactly the image loss of ``modality_losses_for`` (Janus: VQ
  codes through the generation head; Chameleon/Emu3: image-token ids of the vocabulary map).

An image *input* is a position the model reads an image at without being asked to produce it:
the ``<image>`` placeholder (replaced by encoded ``pixel_values``), and, for the vocabulary
architectures (Chameleon/Emu3), an image-token id in ``input_ids`` whose own target is not an
image target (a pre-tokenised image whose labels are ``ignore_index``: shown, not generated).

The three masks are disjoint and their union is the two-objective targets, so the token-weighted
sums agree: ``n_text * text + n_understanding * understanding = n_text2 * text2`` and
``generation = image2`` (tests/archs/test_arch_objectives.py). The forward, the heads and the
masks are those of :mod:`.losses` and :mod:`.forward` (through DDP too); only the split is new.
LLaVA-style text-only models (``image_objective="user_split"``) are refused: their two
objectives are already (text, image-conditioned text), and a generation loss cannot exist.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .detect import detect_arch
from .forward import forward_losses, module_at
from .losses import _labels, _mean_ce, _target_masks, seen_before
from .spec import ArchSpec, inner_module

__all__ = ["OBJECTIVES", "objective_masks", "objective_losses_for", "objective_token_counts_for", "image_input_mask"]

#: The objectives of a mixed unified-model batch, in the order the losses are returned.
OBJECTIVES = ("text", "understanding", "generation")


def _check_arch(spec: ArchSpec) -> None:
    if spec.image_objective == "user_split":
        raise ValueError(
            f"model: {spec.name} generates only text, so it has no generation objective; its two objectives "
            "(text, image-conditioned text) are pareto_lora.archs.modality_losses_for's"
        )


def image_input_mask(batch, spec: ArchSpec, is_image: torch.Tensor) -> torch.Tensor:
    """Bool [batch, seq] over input positions: the model reads an image there (see the module docstring).

    ``is_image``: the image-target mask (:func:`~pareto_lora.archs.image_token_mask`), aligned with labels.
    """
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("batch: expected input_ids as a [batch, seq] LongTensor (the image inputs are read from it)")
    if input_ids.shape != is_image.shape:
        raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} (as input_ids), got {tuple(is_image.shape)}")
    inputs = torch.zeros_like(is_image)
    if spec.placeholder_token_id is not None:
        inputs |= input_ids == spec.placeholder_token_id
    if spec.image_objective == "vocab_tokens":
        ids = torch.tensor(spec.image_token_ids, device=input_ids.device, dtype=input_ids.dtype)
        inputs |= torch.isin(input_ids, ids) & ~is_image
    return inputs


def objective_masks(model: nn.Module, batch, spec: ArchSpec | None = None, ignore_index: int = -100) -> dict:
    """name -> bool [batch, seq] target mask, aligned with labels, for each of :data:`OBJECTIVES`.

    Disjoint; their union is the two-objective (text | image) targets.
    """
    spec = detect_arch(model) if spec is None else spec
    _check_arch(spec)
    _, is_text, is_image = _target_masks(model, batch, spec, ignore_index)
    conditioned = seen_before(image_input_mask(batch, spec, is_image))
    return {"text": is_text & ~conditioned, "understanding": is_text & conditioned, "generation": is_image}


def _divisors(num_items) -> dict:
    if num_items is None:
        return dict.fromkeys(OBJECTIVES)
    if not isinstance(num_items, Mapping) or set(num_items) != set(OBJECTIVES):
        got = sorted(num_items) if isinstance(num_items, Mapping) else type(num_items).__name__
        raise ValueError(f"num_items: expected a dict with the keys {', '.join(OBJECTIVES)}, got {got}")
    return dict(num_items)


def objective_losses_for(
    model: nn.Module,
    batch,
    spec: ArchSpec | None = None,
    ignore_index: int = -100,
    num_items: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """``{"text": .., "understanding": .., "generation": ..}``: float32 token means over each one's targets.

    One forward (the architecture's, as :func:`~pareto_lora.archs.modality_losses_for`; through the
    wrapper's forward under DDP). An objective without a target in the batch gives a zero loss that
    still requires grad. ``num_items``: optional ``{name: count}`` divisors (gradient accumulation:
    counts of the whole accumulated batch, :func:`objective_token_counts_for`).

    Usage (Janus)::

        pl = pareto_lora.ParetoLoRA(model, arch="auto", objectives=pareto_lora.archs.OBJECTIVES)
        pl.backward(losses=pareto_lora.archs.objective_losses_for(model, batch, pl.arch))
    """
    spec = detect_arch(model) if spec is None else spec
    divisors = _divisors(num_items)
    masks = objective_masks(model, batch, spec, ignore_index)
    labels = _labels(batch, ignore_index)
    inner = inner_module(model)
    text_head, image_head = module_at(inner, spec.text_head), module_at(inner, spec.image_head)
    codes = batch.get("image_codes") if spec.image_objective == "gen_head" else None
    image_targets = labels if codes is None else codes  # no codes: no generation target (all-False mask)
    scored = {"text": (labels, text_head), "understanding": (labels, text_head), "generation": (image_targets, image_head)}

    def losses_of(hidden: torch.Tensor) -> tuple:
        hidden = hidden[:, :-1]
        return tuple(_mean_ce(hidden, scored[n][0][:, 1:], masks[n][:, 1:], scored[n][1], divisors[n]) for n in OBJECTIVES)

    return dict(zip(OBJECTIVES, forward_losses(model, batch, spec, losses_of, ignore_index)))


def objective_token_counts_for(model: nn.Module, batch, spec: ArchSpec | None = None, ignore_index: int = -100) -> dict:
    """``{name: number of targets}`` of `batch`, as :func:`objective_losses_for` divides by them."""
    masks = objective_masks(model, batch, spec, ignore_index)
    return {n: m[:, 1:].sum() for n, m in masks.items()}

"""One call from a model and a batch to its (text loss, image loss): :func:`modality_losses_for`.

Named after :func:`pareto_lora.modality_losses` (which takes logits the user computed): this one
takes the *model* and runs the right forward for its architecture, because for Chameleon and
Janus the logits of ``model(**batch)`` cannot give a correct image loss (see
:mod:`pareto_lora.archs.forward`).

Targets follow the causal-LM convention: ``hidden[:, t]`` predicts ``labels[:, t + 1]``;
``labels`` defaults to ``input_ids``; ``ignore_index`` (-100) marks positions without a target.
Both losses are token means over their own targets, in float32. A modality with no target in
the batch gives a zero loss that still requires grad (its gradient is zero everywhere).

What counts as an image target (:func:`image_token_mask`), per ``spec.image_objective``:

* ``vocab_tokens`` (Chameleon/Anole, Emu3): labels that are image-token ids of the model's own
  vocabulary map (codes and image markers), scored by the LM head over the full vocabulary.
* ``gen_head`` (Janus): ``batch["image_codes"]`` (VQ code per generated-image position,
  ``ignore_index`` elsewhere), scored by the generation head; text targets by ``lm_head``.
* ``user_split`` (LLaVA; any text-output model): ``batch["image_token_mask"]`` if given, else
  the *image-conditioned* targets: those after an ``<image>`` placeholder in their sequence.

``batch["image_token_mask"]`` (bool, aligned with labels) overrides the vocabulary rule too.
The ``<image>`` input placeholder is never a target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .detect import detect_arch
from .forward import forward_losses, module_at
from .spec import ArchSpec, inner_module

__all__ = ["modality_losses_for", "modality_token_counts_for", "image_token_mask"]


def _labels(batch, ignore_index: int) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:
        labels = batch.get("input_ids")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError("batch: expected labels (or input_ids) as a [batch, seq] LongTensor")
    return labels


def _valid(labels: torch.Tensor, spec: ArchSpec, ignore_index: int) -> torch.Tensor:
    """Positions with a target: not ignore_index and not the ``<image>`` input placeholder."""
    valid = labels != ignore_index
    if spec.placeholder_token_id is not None:
        valid &= labels != spec.placeholder_token_id
    return valid


def _target_masks(model, batch, spec: ArchSpec, ignore_index: int):
    """(labels, text-target mask, image-target mask), all [batch, seq] aligned with labels."""
    labels = _labels(batch, ignore_index)
    is_image = image_token_mask(model, batch, spec, ignore_index)
    return labels, _valid(labels, spec, ignore_index) & ~is_image, is_image


def image_token_mask(model: nn.Module, batch, spec: ArchSpec | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Bool [batch, seq], aligned with labels: True where the target is an image target.

    Derived from the model's own config (vocabulary map; Janus: ``batch["image_codes"]``;
    LLaVA: the ``<image>`` placeholders) unless ``batch["image_token_mask"]`` gives the split
    explicitly. Pass ``spec`` to reuse a detected/overridden :class:`ArchSpec`.
    """
    spec = detect_arch(model) if spec is None else spec
    labels = _labels(batch, ignore_index)
    valid = _valid(labels, spec, ignore_index)
    if spec.image_objective == "gen_head":
        if batch.get("image_token_mask") is not None:
            raise ValueError(f"batch: {spec.name} takes its image targets from batch['image_codes'], not image_token_mask")
        codes = batch.get("image_codes")
        return torch.zeros_like(valid) if codes is None else (codes != ignore_index)
    user = batch.get("image_token_mask")
    if user is not None:
        if not isinstance(user, torch.Tensor) or user.shape != labels.shape:
            raise ValueError(f"image_token_mask: expected shape {tuple(labels.shape)} (as labels), got {tuple(getattr(user, 'shape', ()))}")
        return user.to(device=labels.device, dtype=torch.bool) & valid
    if spec.image_objective == "vocab_tokens":
        ids = torch.tensor(spec.image_token_ids, device=labels.device, dtype=labels.dtype)
        return torch.isin(labels, ids) & valid
    return _image_conditioned(batch, spec, labels) & valid


def _image_conditioned(batch, spec: ArchSpec, labels: torch.Tensor) -> torch.Tensor:
    """Targets whose prediction sees an ``<image>`` placeholder (LLaVA's default image objective)."""
    input_ids = batch.get("input_ids")
    if spec.placeholder_token_id is None or input_ids is None:
        raise ValueError(
            f"batch: {spec.name} generates only text and no image split is defined; pass batch['image_token_mask'] "
            "(bool, aligned with labels) or ArchOverrides(image_token_ids=...)"
        )
    return seen_before(input_ids == spec.placeholder_token_id)


def seen_before(inputs: torch.Tensor) -> torch.Tensor:
    """Bool [batch, seq] aligned with labels: the prediction of labels[:, t] sees an input position
    where `inputs` (bool [batch, seq], over input positions) is True."""
    seen = inputs.long().cumsum(1) > 0
    # labels[t] is predicted from position t-1, which sees positions <= t-1.
    out = torch.zeros_like(seen)
    out[:, 1:] = seen[:, :-1]
    return out


def _mean_ce(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, head: nn.Module, divisor) -> torch.Tensor:
    """Sum of cross-entropy of `head(hidden)` at the masked positions, divided by `divisor`.

    Only the selected rows go through the head: an image loss never materialises text-position
    logits and vice versa. An empty selection gives 0 that still requires grad.
    """
    logits = head(hidden[mask]).float()
    total = F.cross_entropy(logits, targets[mask], reduction="sum")
    if divisor is None:
        divisor = mask.sum()
    return total / torch.as_tensor(divisor, device=total.device).clamp_min(1).to(total.dtype)


def modality_losses_for(
    model: nn.Module,
    batch,
    spec: ArchSpec | None = None,
    ignore_index: int = -100,
    num_items: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text loss, image loss) of `model` on `batch`, with the forward its architecture needs.

    Args:
        model: the PEFT model (or plain transformers model), or a ``DistributedDataParallel``
            wrapper of it: then the forward runs through the wrapper (see
            :mod:`pareto_lora.archs.forward`), so DDP averages the gradients of the backward.
        batch: dict with ``input_ids`` and optionally ``labels``, ``attention_mask``,
            ``pixel_values`` (+ ``image_sizes`` for Emu3), ``image_token_mask`` (user split),
            ``image_codes`` (Janus generated-image VQ codes).
        spec: an :class:`ArchSpec` (default: ``detect_arch(model)``); detect once and reuse it.
        num_items: optional ``(n_text, n_image)`` divisors (gradient accumulation: the counts of
            the whole accumulated batch); default: this batch's target counts.

    Usage::

        pl = pareto_lora.ParetoLoRA(model, arch="auto", num_groups=4, modulate="lower")
        text, image = pareto_lora.archs.modality_losses_for(model, batch, pl.arch)
        pl.backward(text=text, image=image)
    """
    spec = detect_arch(model) if spec is None else spec
    if num_items is not None and len(num_items) != 2:
        raise ValueError(f"num_items: expected (n_text, n_image), got {num_items!r}")
    n_text, n_image = num_items if num_items is not None else (None, None)
    labels, is_text, is_image = _target_masks(model, batch, spec, ignore_index)
    image_targets = batch["image_codes"] if spec.image_objective == "gen_head" else labels
    inner = inner_module(model)
    text_head, image_head = module_at(inner, spec.text_head), module_at(inner, spec.image_head)

    def losses_of(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden[:, :-1]
        text = _mean_ce(hidden, labels[:, 1:], is_text[:, 1:], text_head, n_text)
        image = _mean_ce(hidden, image_targets[:, 1:], is_image[:, 1:], image_head, n_image)
        return text, image

    text, image = forward_losses(model, batch, spec, losses_of, ignore_index)
    return text, image


def modality_token_counts_for(model: nn.Module, batch, spec: ArchSpec | None = None, ignore_index: int = -100):
    """(number of text targets, number of image targets) of `batch`, as used by :func:`modality_losses_for`.

    Sum them over the micro-batches of an accumulated step and pass them as ``num_items``.
    """
    spec = detect_arch(model) if spec is None else spec
    _, is_text, is_image = _target_masks(model, batch, spec, ignore_index)
    return is_text[:, 1:].sum(), is_image[:, 1:].sum()

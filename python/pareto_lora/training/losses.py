"""Token-level cross-entropy split into a text and an image objective.

For unified models that predict discrete image tokens (Chameleon / Emu3 / Janus style), the
usual causal-LM loss is one cross-entropy over all label positions; here the positions are
split by whether the *target* token is an image token.

Alignment: as in transformers' causal-LM loss, ``logits[:, t]`` predicts ``labels[:, t + 1]``.
``image_token_mask`` is aligned with ``labels`` (and ``input_ids``): ``mask[b, t]`` says that
``labels[b, t]`` is an image token, i.e. the loss term of ``logits[b, t - 1]`` is an image
term. Position 0 is never a target.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["modality_losses", "modality_token_counts"]


def _targets(labels, image_token_mask, image_token_range, ignore_index):
    """(shifted labels, text-target mask, image-target mask), all [B, T-1]."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels: expected a [batch, seq] tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        # cross_entropy would read float targets as class probabilities: a different loss, no error.
        raise ValueError(f"labels: expected integer token ids (int64), got dtype {str(labels.dtype).removeprefix('torch.')}")
    if (image_token_mask is None) == (image_token_range is None):
        raise ValueError(
            "image_token_mask: pass exactly one of image_token_mask (bool [batch, seq], aligned with labels) "
            "or image_token_range=(first_id, end_id) (image-token ids, end exclusive)"
        )
    target = labels[:, 1:]
    valid = target != ignore_index
    if image_token_mask is not None:
        if not isinstance(image_token_mask, torch.Tensor) or image_token_mask.shape != labels.shape:
            raise ValueError(
                f"image_token_mask: expected shape {tuple(labels.shape)} (same as labels), "
                f"got {tuple(getattr(image_token_mask, 'shape', ()))}"
            )
        is_image = image_token_mask[:, 1:].to(device=labels.device, dtype=torch.bool)
    else:
        try:
            lo, hi = (int(x) for x in image_token_range)
        except (TypeError, ValueError):
            raise ValueError(f"image_token_range: expected (first_id, end_id), got {image_token_range!r}") from None
        if not lo < hi:
            raise ValueError(f"image_token_range: expected first_id < end_id, got {image_token_range!r}")
        is_image = (target >= lo) & (target < hi)
    return target, valid & ~is_image, valid & is_image


def _check_ids(target: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Every target is ignore_index or an id in [0, vocab): an id outside is an IndexError on the
    CPU and a device-side assert (which ends the process) on a GPU. One host sync."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ValueError(f"labels: expected ids in [0, {vocab}) (the logits' vocabulary) or ignore_index "
                         f"({ignore_index}), got {first}")


def _check_num_items(num_items) -> tuple:
    """(n_text, n_image), each None, a number or a scalar tensor: finite and >= 0 (0 means no target)."""
    if num_items is None:
        return None, None
    if isinstance(num_items, (str, bytes)) or not hasattr(num_items, "__len__") or len(num_items) != 2:
        raise ValueError(f"num_items: expected (n_text, n_image), got {num_items!r}")
    values = []
    for n in num_items:
        if isinstance(n, torch.Tensor):
            ok = n.numel() == 1 and not n.dtype.is_complex and n.dtype != torch.bool
            ok = ok and bool(torch.isfinite(n).all() & (n >= 0).all())
        else:
            ok = isinstance(n, numbers.Real) and not isinstance(n, bool) and math.isfinite(n) and n >= 0
        if not ok:
            raise ValueError(f"num_items: expected two finite numbers >= 0 (token counts), got {num_items!r}")
        values.append(n)
    return tuple(values)


def modality_token_counts(labels, image_token_mask=None, image_token_range=None, ignore_index: int = -100):
    """(number of text targets, number of image targets) as int64 tensors, after the causal shift.

    Sum these over the micro-batches of an accumulated step and pass them as ``num_items`` to
    :func:`modality_losses` so that accumulation matches one step on the whole batch.
    """
    _, text_mask, image_mask = _targets(labels, image_token_mask, image_token_range, ignore_index)
    return text_mask.sum(), image_mask.sum()


def modality_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    image_token_mask: torch.Tensor | None = None,
    image_token_range: tuple[int, int] | None = None,
    ignore_index: int = -100,
    num_items: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text loss, image loss): cross-entropy of the next-token prediction, split by target modality.

    Args:
        logits: [batch, seq, vocab] (any float dtype; computed in float32).
        labels: [batch, seq] token ids, ``ignore_index`` where there is no target.
        image_token_mask: bool [batch, seq] aligned with ``labels``: True where the label is an
            image token (see the module docstring for the shift).
        image_token_range: alternatively, ``(first_id, end_id)``: labels in [first_id, end_id)
            are image tokens.
        num_items: optional ``(n_text, n_image)`` divisors; default: this batch's counts of
            text and image targets (a per-modality mean).

    A modality with no target in the batch gets a zero loss that still requires grad (its
    gradient is zero; the integration treats that group as degenerate: plain sum).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits: expected a [batch, seq, vocab] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    target, text_mask, image_mask = _targets(labels, image_token_mask, image_token_range, ignore_index)
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits: expected leading shape {tuple(labels.shape)} (as labels), got {tuple(logits.shape[:2])}")
    num_items = _check_num_items(num_items)
    vocab = logits.shape[-1]
    _check_ids(target, ignore_index, vocab)
    target = target.long()
    pred = logits[:, :-1].reshape(-1, vocab).float()
    # ignore_index rows give 0 here; the masks below drop them anyway.
    ce = F.cross_entropy(pred, target.reshape(-1), ignore_index=ignore_index, reduction="none").view_as(target)
    zero = ce.new_zeros(())

    def reduce(mask: torch.Tensor, divisor) -> torch.Tensor:
        # where() (not a multiply) so that an infinite term outside the mask cannot become NaN.
        total = torch.where(mask, ce, zero).sum()
        if divisor is None:
            divisor = mask.sum()
        return total / torch.as_tensor(divisor, device=total.device).clamp_min(1).to(total.dtype)

    return reduce(text_mask, num_items[0]), reduce(image_mask, num_items[1])

"""The checks a training step makes on its arguments, shared by the two- and K-objective steps."""

from __future__ import annotations

import torch

__all__ = ["NONFINITE_MODES", "check_loss"]

#: ``on_nonfinite``: what a non-finite accumulated loss does at ``integrate_accumulated()``.
NONFINITE_MODES = ("auto", "raise", "skip")


def check_loss(name: str, loss) -> None:
    """A scalar loss Tensor that requires grad; ValueError naming the objective otherwise."""
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"{name}: expected a loss Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name}: expected a scalar loss, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            f"{name}: the loss does not require grad (computed under torch.no_grad(), detached, "
            "or the model has no trainable parameters)"
        )

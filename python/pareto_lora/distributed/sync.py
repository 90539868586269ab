"""The sync contract: how one step's two objectives become integrated gradients on this process.

:class:`ParetoLoRA <pareto_lora.training.ParetoLoRA>` talks to exactly one :class:`GradSync`
and never asks which kind it holds. :class:`LocalSync` is the single-process implementation
(and the base of the DDP one); :mod:`.ddp` and :mod:`.fsdp` implement the same contract for
several processes. Every rank must end a step with the integrated gradient a single process
would compute from the global-batch losses.
May import: :mod:`pareto_lora.flat`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ..flat import FlatGrads, FlatStep, GradLayout, flat_step, is_lora_param
from ..flat.step import RuleFn

__all__ = ["GradSync", "LocalSync", "SyncFailure", "Settle"]

#: ``settle(losses, integrated) -> poison``: the owner's verdict on the (global) accumulated losses,
#: called once per step before the result is final. Returns a 0-d bool device tensor (poison the
#: step: NaN gradients, cases NONFINITE) or None, or raises. ``integrated``: ``.grad`` already
#: holds the integration (the DDP hook ran during the backward).
Settle = Callable[[torch.Tensor, bool], "torch.Tensor | None"]


class SyncFailure(RuntimeError):
    """The synchronisation itself failed during a backward; the step's accumulation is lost."""


class GradSync(Protocol):
    """What the training step needs from single-process, DDP and FSDP2 training alike."""

    #: the module whose trainable parameters are laid out (the model inside any wrapper)
    module: nn.Module

    def layout_for(self, layout: GradLayout) -> GradLayout:
        """The layout of this process's buffers (FSDP2: local shards)."""
        ...

    def bind(self, layout: GradLayout, text: FlatGrads, image: FlatGrads, rule_fn: RuleFn, backend: str) -> None:
        """Called once, with the buffers the objectives accumulate into and the owner's rule."""
        ...

    def backward(self, text_loss: torch.Tensor, image_loss: torch.Tensor, first: bool, losses: torch.Tensor) -> None:
        """Backpropagate both objectives into their buffers. ``first``: a new accumulation starts;
        ``losses``: the step's running (text, image) loss totals including this micro-batch."""
        ...

    def finish(self, losses: torch.Tensor, settle: Settle) -> FlatStep:
        """Integrate the accumulated buffers into ``.grad`` (or report the integration done)."""
        ...


def _reaches(loss: torch.Tensor, targets: set[int]) -> bool:
    """Whether the autograd graph of `loss` accumulates into any parameter whose id is in `targets`."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad nodes carry their leaf
        if var is not None and id(var) in targets:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


class LocalSync:
    """One process. The text gradient is taken with ``torch.autograd.grad`` into the text buffer;
    the image gradient by an ordinary ``.backward()`` into ``.grad``, which views the image buffer
    (a DDP hook sees only that second backward: :class:`pareto_lora.distributed.ddp.DDPSync`)."""

    def __init__(self, model: nn.Module):
        self.module = model

    def layout_for(self, layout: GradLayout) -> GradLayout:
        return layout

    def bind(self, layout: GradLayout, text: FlatGrads, image: FlatGrads, rule_fn: RuleFn, backend: str) -> None:
        self.layout, self.text, self.image, self.rule_fn, self.backend = layout, text, image, rule_fn, backend
        self._lora_ids = {id(p) for p, n in zip(layout.params, layout.names) if is_lora_param(n)}
        self._image_reach_checked = False

    def backward(self, text_loss: torch.Tensor, image_loss: torch.Tensor, first: bool, losses: torch.Tensor) -> None:
        params = self.layout.params
        grads = torch.autograd.grad(text_loss, params, retain_graph=True, allow_unused=True)
        if not any(g is not None and id(p) in self._lora_ids for p, g in zip(params, grads)):
            raise ValueError("text: the loss does not depend on any trainable LoRA parameter")
        if not self._image_reach_checked:
            # A graph walk; once is enough to catch a loss built from the wrong tensors.
            if not _reaches(image_loss, self._lora_ids):
                raise ValueError("image: the loss does not depend on any trainable LoRA parameter")
            self._image_reach_checked = True
        self.image.attach_as_grad(params, first)
        self._before_text(first)
        self.text.accumulate(grads, first)
        del grads
        self._image_backward(image_loss, losses)

    def _before_text(self, first: bool) -> None:
        """Hook for subclasses, after ``.grad`` is attached and before the text buffer changes."""

    def _image_backward(self, image_loss: torch.Tensor, losses: torch.Tensor) -> None:
        image_loss.backward()

    def finish(self, losses: torch.Tensor, settle: Settle) -> FlatStep:
        poison = settle(losses, False)
        return flat_step(self.text.flats, self.image.flats, self.layout, self.rule_fn, poison=poison, backend=self.backend)

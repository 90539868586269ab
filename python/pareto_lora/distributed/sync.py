"""The sync contract: how one step's two objectives become integrated gradients on this process.

:class:`ParetoLoRA <pareto_lora.training.ParetoLoRA>` talks to exactly one :class:`GradSync`
and never asks which kind it holds. :class:`LocalSync` is the single-process implementation
(and the base of the DDP one); :mod:`.ddp` and :mod:`.fsdp` implement the same contract for
several processes. Every rank must end a step with the integrated gradient a single process
would compute from the global-batch losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import math

import torch
from torch import nn

from .. import args
from ..flat import FlatGrads, FlatStep, GradLayout, StepRule, flat_step, is_lora_param
from .traversal import TRAVERSALS, batched, batched_pays, checkpointing_modules, sum_first

__all__ = ["GradSync", "LocalSync", "SyncFailure", "Settle", "set_traversal"]

#: ``settle(losses, integrated) -> poison``: the owner's verdict on the (global) accumulated losses,
#: called once per step before the result is final. Returns a 0-d bool device tensor (poison the
#: step: NaN gradients, cases NONFINITE) or None, or raises. ``integrated``: ``.grad`` already
#: holds the integration (the DDP hook ran during the backward).
Settle = Callable[[torch.Tensor, bool], "torch.Tensor | None"]


class SyncFailure(RuntimeError):
    """The synchronisation itself failed during a backward; the step's accumulation is lost."""


def window_lost(error: BaseException) -> SyncFailure:
    """A failure after a sync had started changing its buffers (a freed graph, a kernel error):
    the window cannot be restored, so the owner must start a new one. The cause is chained."""
    lost = SyncFailure(
        f"backward: failed after the gradient buffers were modified ({type(error).__name__}: {error}); "
        "the gradients accumulated in this step are lost, start the step again"
    )
    lost.__cause__ = error
    return lost


class GradSync(Protocol):
    """What the training step needs from single-process, DDP and FSDP2 training alike."""

    #: the module whose trainable parameters are laid out (the model inside any wrapper)
    module: nn.Module
    #: whether the accumulated buffers between backward() calls are the whole state of a window
    #: (a checkpoint may then be taken mid-accumulation)
    saves_mid_window: bool
    #: whether the rule function runs once per step on all groups (a step-to-step state, such as an
    #: average of the statistics, is then updated once per step)
    calls_rule_once: bool

    def layout_for(self, layout: GradLayout) -> GradLayout:
        """The layout of this process's buffers (FSDP2: local shards)."""
        ...

    def bind(self, layout: GradLayout, text: FlatGrads, image: FlatGrads, rule: StepRule, backend: str) -> None:
        """Called once, with the buffers the objectives accumulate into and the owner's rule: its
        ``spec`` (a RuleSpec, read at every step and run inside the fused op) or, where the owner
        needs the statistics first, its ``python_rule`` (:class:`pareto_lora.flat.StepRule`)."""
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
    """One process. Both gradients are taken with ``torch.autograd.grad`` (in one batched
    traversal or two passes, :mod:`.traversal`) and added into their persistent buffers only once
    both exist; ``.grad`` views the image buffer, into which the integration writes.
    (:class:`pareto_lora.distributed.ddp.DDPSync` hands the image gradient to an ordinary
    ``.backward()`` instead, of the loss or a replay from the parameters: DDP's hook sees only such a backward.)"""

    saves_mid_window = True
    calls_rule_once = True
    kind = "one process"
    refused_traversals: dict[str, str] = {}  # traversal -> why this sync cannot take it (set_traversal)

    def __init__(self, model: nn.Module):
        self.module = model
        self.traversal = "auto"  # set_traversal
        self.last_traversal: str | None = None  # the one the last successful backward took

    def layout_for(self, layout: GradLayout) -> GradLayout:
        return layout

    def bind(self, layout: GradLayout, text: FlatGrads, image: FlatGrads, rule: StepRule, backend: str) -> None:
        self.layout, self.text, self.image, self.rule, self.backend = layout, text, image, rule, backend
        self._lora_ids = {id(p) for p, n in zip(layout.params, layout.names) if is_lora_param(n)}
        self._checkpointing = checkpointing_modules(self.module)
        unit_active = layout.active[layout.unit_group].tolist()
        self._modulated = [i for i, u in enumerate(layout.param_unit) if unit_active[u]]
        if self.traversal == "sum_first":
            low = sorted({str(b.dtype) for b in layout.buckets if b.dtype not in (torch.float32, torch.float64)})
            if low:
                raise ValueError(f"traversal: 'sum_first' expected float32 or float64 trainable parameters, got "
                                 f"{', '.join(low)} (the modulated groups' image gradient is a difference of two "
                                 "backwards: its rounding grows with the text/image ratio, too far at this precision)")

    def _check(self, text_loss: torch.Tensor, image_loss: torch.Tensor, first: bool, text_too: bool) -> None:
        """The checks that must pass before anything changes: ``.grad`` intact, the losses reach a LoRA parameter."""
        if not first:
            self.image.check_attached(self.layout.params)
        # Every call: a loss computed on another model can come at any micro-batch. The walk stops
        # at the first LoRA leaf, which depth-first search meets within the last layer or so.
        if not _reaches(image_loss, self._lora_ids):
            raise ValueError("image: the loss does not depend on any trainable LoRA parameter of this model")
        if text_too and not _reaches(text_loss, self._lora_ids):
            raise ValueError("text: the loss does not depend on any trainable LoRA parameter of this model")

    def text_grads(self, text_loss: torch.Tensor, image_loss: torch.Tensor, first: bool) -> tuple:
        """The text gradient (``autograd.grad``, graph kept for the image), after the checks that
        must pass before anything changes: both losses reach a LoRA parameter, ``.grad`` intact."""
        params = self.layout.params
        self._check(text_loss, image_loss, first, text_too=False)
        grads = torch.autograd.grad(text_loss, params, retain_graph=True, allow_unused=True)
        if not any(g is not None and id(p) in self._lora_ids for p, g in zip(params, grads)):
            raise ValueError("text: the loss does not depend on any trainable LoRA parameter of this model")
        return grads

    def choose_traversal(self, text_loss: torch.Tensor, image_loss: torch.Tensor) -> str:
        """The traversal this backward takes (``"auto"`` resolved; :mod:`.traversal`)."""
        if self.traversal != "auto":
            return self.traversal
        return "batched" if batched_pays(self._checkpointing, text_loss, image_loss) else "two_pass"

    def backward(self, text_loss: torch.Tensor, image_loss: torch.Tensor, first: bool, losses: torch.Tensor) -> None:
        # Both gradients are taken before anything changes, so a backward that fails (a freed
        # graph, an error in the model) leaves .grad and the accumulation exactly as they were.
        how = self.choose_traversal(text_loss, image_loss)
        params = self.layout.params
        if how == "two_pass":
            text = self.text_grads(text_loss, image_loss, first)
            image = torch.autograd.grad(image_loss, params, allow_unused=True)
        else:
            self._check(text_loss, image_loss, first, text_too=True)
            if how == "batched":
                text, image = batched(text_loss, image_loss, params)
            else:
                text, image = sum_first(text_loss, image_loss, params, self._modulated)
        if any(g is not None for g in text):
            self.text.accumulate(text, first)
        elif first:  # sum_first with no modulated group: no text gradient was taken
            self.text.zero_()
        self.image.accumulate(image, first)
        self.image.attach_as_grad(params)
        self.last_traversal = how

    def finish(self, losses: torch.Tensor, settle: Settle) -> FlatStep:
        poison = settle(losses, False)
        step = flat_step(self.text.flats, self.image.flats, self.layout, self.rule, poison=poison, backend=self.backend)
        self.image.attach_as_grad(self.layout.params)  # even if a zero_grad() detached them
        if self.traversal == "sum_first":
            # The unmodulated groups were integrated from (0, text + image): their exact sum. Their
            # text/image statistics were not taken: NaN, as in a balancer's one-backward mode.
            lay = self.layout
            step.unit_stats = torch.where(lay.active[lay.unit_group][:, None], step.unit_stats, math.nan)
            step.group_stats = torch.where(lay.active[:, None], step.group_stats, math.nan)
        return step


def set_traversal(sync, traversal: str, balanced: bool) -> None:
    """``ParetoLoRA(traversal=)``: validated before the sync is bound (see :mod:`.traversal`).

    A sync names the traversals it cannot take, with the reason, in ``refused_traversals``
    (DDP: ``sum_first``; FSDP2: all but two passes); a sync without that attribute takes two passes."""
    args.choice("traversal", traversal, TRAVERSALS)
    refused = getattr(sync, "refused_traversals", None)
    if refused is None:
        refused = {t: "this sync takes two passes" for t in TRAVERSALS if t not in ("auto", "two_pass")}
    if traversal in refused:
        allowed = ", ".join(repr(t) for t in TRAVERSALS if t not in refused)
        raise ValueError(f"traversal: expected {allowed} under {getattr(sync, 'kind', type(sync).__name__)}, got "
                         f"{traversal!r} ({refused[traversal]})")
    if traversal == "sum_first" and balanced:
        raise ValueError("traversal: 'sum_first' does not apply to a balancer (its loss weights scale every group's "
                         "text and image gradients, which sum_first keeps apart only in the modulated groups)")
    sync.traversal = traversal

"""Two-objective training step on a PEFT LoRA model: ParetoLoRA.

Typical use (one optimizer step per batch)::

    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", tau=0.5, num_groups=5, modulate="lower")
    out = model(**batch)
    loss_text, loss_image = pareto_lora.modality_losses(out.logits, batch["labels"],
                                                        image_token_mask=batch["image_token_mask"])
    report = pl.backward(text=loss_text, image=loss_image)   # integrated gradients now in .grad
    optimizer.step(); optimizer.zero_grad()

Gradient accumulation: call ``pl.backward(text=, image=, step=False)`` (or its alias
``pl.accumulate(text=, image=)``) on every micro-batch; each objective accumulates in its own
buffer. Then ``report = pl.integrate_accumulated()`` runs the rule once on the accumulated
gradients and writes the result into ``.grad``. Scale the micro-batch losses as for plain accumulation
(divide by k, or normalise by the token counts of the whole accumulated batch).

Mixed precision: run the forward under ``torch.autocast``; with a ``torch.amp.GradScaler``
pass it as ``pl.backward(text=, image=, scaler=scaler)``: both losses get the same scale (the
rules are scale-invariant in direction, and ``mmpareto``'s magnitude is linear in it), and
then ``scaler.step(optimizer); scaler.update()`` as usual. A non-finite gradient leaves its
group with case NONFINITE (plain sum), so the inf/NaN reaches the scaler, which skips the
step. A non-finite *loss* (e.g. image-token logits masked to -inf) can still have finite
gradients; it raises FloatingPointError at ``integrate_accumulated()`` without a scaler, and with one the
integrated gradient is set to NaN so that the scaler skips the step (``on_nonfinite``).

Gradient storage: every trainable parameter's gradient lives in two persistent flat buffers per
dtype (:class:`pareto_lora.flat.FlatGrads`), one per objective. The text gradient is taken with
``torch.autograd.grad`` and copied into the text buffer's views; the image gradient is
accumulated by an ordinary ``.backward()`` into ``param.grad``, which is a view of the image
buffer. The integration then runs on the two buffers and writes into the image buffer, i.e.
into ``.grad``: no per-step concatenation or allocation of gradient-sized tensors. (This split
is what a DDP communication hook needs: only the image backward triggers DDP's reduction.)

ParetoLoRA owns ``.grad`` of the model's trainable parameters: the first ``backward`` after
an ``integrate_accumulated()`` starts a fresh accumulation from zero, whether or not ``zero_grad`` ran.
Activation checkpointing must be the non-reentrant kind (``use_reentrant=False``), because the
reentrant one does not support ``torch.autograd.grad``.

Several processes: pass the ``DistributedDataParallel`` model (ParetoLoRA registers its own
communication hook; keep DDP's default ``gradient_as_bucket_view=False``) or an FSDP2
``fully_shard`` model; the calls are the same and every rank gets the integrated gradient of
the global batch (see :mod:`pareto_lora.distributed`). With DDP, ``no_sync()`` accumulation
works as usual: the last micro-batch must run outside ``no_sync()``. Under DDP the integration
itself runs inside the communication hook, so ``.grad`` is integrated when that backward returns
and ``integrate_accumulated()`` only checks the global losses and builds the report.

ParetoLoRA holds one :class:`pareto_lora.distributed.GradSync` (single process, DDP or FSDP2)
and calls it without asking which kind it is.
May import: :mod:`pareto_lora.distributed`, :mod:`pareto_lora.flat`, :mod:`pareto_lora.backends`,
:mod:`pareto_lora.ops`, :mod:`pareto_lora.rules`, :mod:`.report`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from .. import ops
from ..backends import resolve_backend
from ..distributed import SyncFailure, make_sync
from ..flat import FlatGrads, build_layout
from ..rules import RuleSpec
from .balancers import Balancer, resolve_rule
from .balancers.base import balancer_state, check_balancer_state, load_balancer_state
from .report import StepReport
from .rule_options import RuleOptions, check_optimizer

__all__ = ["ParetoLoRA"]

NONFINITE_MODES = ("auto", "raise", "skip")


def _check_loss(name: str, loss) -> None:
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"{name}: expected a loss Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name}: expected a scalar loss, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            f"{name}: the loss does not require grad (computed under torch.no_grad(), detached, "
            "or the model has no trainable parameters)"
        )


class ParetoLoRA:
    """Modality-balanced gradient integration for a PEFT LoRA model (two objectives: text, image).

    Args:
        model: a PEFT model (``peft.get_peft_model``) or any module with PEFT LoRA layers, or
            such a model wrapped by ``DistributedDataParallel`` or FSDP2 ``fully_shard``.
        rule: integration rule (``pareto_lora.RULES``) for the modulated groups, or a
            :class:`pareto_lora.RuleSpec` (then leave tau, gamma, symmetric unset), or a
            loss-weighting balancer: ``"mimo"``, ``"gradnorm"`` or a
            :mod:`pareto_lora.training.balancers` object such as ``MIMO(lam=20)`` (``self.balancer``).
        tau: imbalance threshold on ||g_text|| / ||g_image|| (default 0.5).
        num_groups: consecutive layer groups of the layer stack (``numpy.array_split`` sizes), or
            ``"per_layer"``.
        modulate: groups that get the rule: "lower", "middle", "upper", "all", "none", the name
            of a group outside the layer stack ("projector"; with ``arch`` also e.g.
            "generation"), a group index (those groups follow the ``num_groups`` layer groups:
            the projector group is index ``num_groups``) or a list of them. Other groups, and
            non-LoRA trainable parameters, get g_text + g_image.
        gamma, symmetric: rule parameters (see ``pareto_lora.integrate``; default 1.0, False).
        layers_path: name of the decoder-layer ModuleList when auto-detection cannot tell.
        arch: None (default: the stack is searched for; LoRA outside it is one "projector"
            group), "auto" (``pareto_lora.archs.detect_arch(model)``) or a
            :class:`pareto_lora.archs.ArchSpec`: the stack and the named groups outside it come
            from the architecture (Janus: "generation" and "projector"). ``self.arch`` holds it.
        on_nonfinite: what a non-finite loss does at ``integrate_accumulated()``: "raise"
            (FloatingPointError), "skip" (NaN gradients, for a GradScaler to skip the step) or
            "auto" (skip when a scaler was passed to ``backward``, else raise).
        backend: backend of the integration ops (``pareto_lora.available_backends()``).
    """

    def __init__(
        self,
        model: nn.Module,
        rule: str | RuleSpec | Balancer = "pareto_lora",
        tau: float | None = None,
        num_groups: int | str = 5,
        modulate="lower",
        *,
        gamma: float | None = None,
        symmetric: bool | None = None,
        layers_path: str | None = None,
        arch=None,
        stats_ema: float | None = None,
        preserve_norm: bool = False,
        on_nonfinite: str = "auto",
        backend: str = "auto",
    ):
        # A balancer (MIMO, GradNorm) wraps the sync; the kernel rule underneath is then "sum".
        self.balancer, self.spec = resolve_rule(rule, tau, gamma, symmetric)
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite: expected one of {', '.join(NONFINITE_MODES)}, got {on_nonfinite!r}")
        self.options = RuleOptions(stats_ema, preserve_norm)
        if self.options.enabled and self.balancer is not None:
            raise ValueError("stats_ema, preserve_norm: expected a kernel rule; they do not apply to a balancer")
        self._sync = make_sync(model)
        if self.options.stats_ema and not getattr(self._sync, "calls_rule_once", True):
            raise ValueError("stats_ema: not supported under DDP yet (the hook runs the rule group by group)")
        if self.balancer is not None:
            self._sync = self.balancer.wrap_sync(self._sync)
        layout = build_layout(self._sync.module, num_groups=num_groups, modulate=modulate, layers_path=layers_path,
                              arch=arch)
        self.layout = self._sync.layout_for(layout)
        self.arch = layout.arch  # the ArchSpec (paths in the model inside any DDP wrapper), or None
        resolve_backend(backend, self.layout.device)
        self.on_nonfinite, self.backend = on_nonfinite, backend
        self.text = FlatGrads(self.layout)
        self.image = FlatGrads(self.layout)
        # The sync reads the rule from here at every step: self.spec (fused into the integrate op),
        # or python_rule where options need the statistics first.
        self._sync.bind(self.layout, self.text, self.image, self, backend)
        # Every parameter and whether it trained when the layout was made: read back each backward.
        self._watched = [(p, p.requires_grad) for p in self._sync.module.parameters()]
        self.last_report: StepReport | None = None
        self._reset()

    # The rule's parameters, read from the one RuleSpec (assign ``spec`` to change them).
    @property
    def rule(self) -> str:
        return self.balancer.name if self.balancer is not None else self.spec.name

    @property
    def tau(self) -> float:
        return self.spec.tau

    @property
    def gamma(self) -> float:
        return self.spec.gamma

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric

    @property
    def python_rule(self):
        """The rule as a Python function of the group statistics where the options (stats_ema,
        preserve_norm) need them before the coefficients; None: ``spec`` runs inside the fused op."""
        return self._rule if self.options.enabled else None

    def _rule(self, group_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coeffs, cases) of every group under the current settings (called by the sync)."""
        return self.options.apply(group_stats, self._kernel_rule)

    def _kernel_rule(self, group_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rule_coefficients(group_stats, self.spec, active=self.layout.active, backend=self.backend)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Warn when this rule can lengthen the gradient and `optimizer` (SGD) steps in proportion."""
        return check_optimizer(optimizer, self.spec, self.options.preserve_norm) if self.balancer is None else None

    def _reset(self) -> None:
        dev = self.layout.device
        self._micro = 0
        self._losses = torch.zeros(2, dtype=torch.float64, device=dev)
        self._bad = torch.zeros(2, dtype=torch.bool, device=dev)
        self._scaled = False

    @property
    def micro_batches(self) -> int:
        """Micro-batches accumulated since the last ``integrate_accumulated()``."""
        return self._micro

    def accumulate(self, text: torch.Tensor, image: torch.Tensor, scaler=None) -> None:
        """Add one micro-batch's text and image gradients to their buffers (no integration)."""
        self.backward(text=text, image=image, step=False, scaler=scaler)

    def backward(self, text: torch.Tensor, image: torch.Tensor, step: bool = True, scaler=None) -> StepReport | None:
        """Backpropagate both objectives of one forward pass; with ``step=True`` also integrate.

        ``scaler``: an optional ``torch.amp.GradScaler``; both losses are scaled by it.
        Returns the :class:`StepReport` when ``step`` is true, else None.
        """
        _check_loss("text", text)
        _check_loss("image", image)
        self._check_trainable()
        t_loss, i_loss = (scaler.scale(text), scaler.scale(image)) if scaler is not None else (text, image)
        batch = torch.stack([text.detach(), image.detach()]).reshape(2).to(torch.float64)
        # The running totals including this micro-batch; under DDP the hook carries them across
        # ranks (in place), so they must exist before the backward. Kept only if it succeeds.
        losses = self._losses + batch
        try:
            self._sync.backward(t_loss, i_loss, first=self._micro == 0, losses=losses)
        except SyncFailure:
            self._reset()
            raise
        self._losses = losses
        self._bad |= ~torch.isfinite(batch)
        self._scaled |= scaler is not None
        self._micro += 1
        return self.integrate_accumulated() if step else None

    def _check_trainable(self) -> None:
        """The parameters that require grad must still be the ones laid out when this was built:
        a newly unfrozen weight would get g_image only, a newly frozen one no gradient at all."""
        # A flag read per parameter (cached list): walking the module tree each step cost ~1 ms.
        if all(p.requires_grad == was for p, was in self._watched):
            return
        module, layout = self._sync.module, self.layout
        known = {id(p) for p in layout.params}
        unfrozen = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in known]
        frozen = [n for p, n in zip(layout.params, layout.names) if not p.requires_grad]
        raise ValueError(
            "model: the trainable parameters changed since ParetoLoRA was built (newly trainable: "
            f"{', '.join(unfrozen[:3]) or 'none'}; newly frozen: {', '.join(frozen[:3]) or 'none'}); "
            "build a new ParetoLoRA for the new set (and a new optimizer)"
        )

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The rule and, mid-accumulation, the micro-batches accumulated so far (both objectives'
        buffers, the running losses): a checkpoint taken between accumulate() calls resumes exactly."""
        if self._micro and not self._sync.saves_mid_window:
            raise RuntimeError(
                "state_dict: under DDP the accumulated gradients live in the communication hook; save between "
                "steps (after integrate_accumulated()), as the Trainer does"
            )
        window = self._micro > 0
        return {
            "version": 1,
            "rule": dataclasses.asdict(self.spec),
            "micro_batches": self._micro,
            "losses": self._losses.detach().cpu().clone(),
            "nonfinite": self._bad.detach().cpu().clone(),
            "scaled": self._scaled,
            "text": [f.detach().cpu().clone() for f in self.text.flats] if window else [],
            "image": [f.detach().cpu().clone() for f in self.image.flats] if window else [],
            "balancer": balancer_state(self.balancer),  # MIMO's floors, GradNorm's weights (None: a kernel rule)
            "options": self.options.state_dict(),  # the statistics' running average, if any
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; everything is checked before anything changes."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("state: expected a ParetoLoRA.state_dict() (version 1)")
        spec = RuleSpec(**state["rule"])
        check_balancer_state(self.balancer, state.get("balancer"))
        micro = int(state["micro_batches"])
        if micro < 0:
            raise ValueError(f"state: expected micro_batches >= 0, got {micro}")
        if micro and not self._sync.saves_mid_window:
            raise ValueError("state: a mid-accumulation checkpoint cannot be loaded under DDP; save between steps")
        flats = list(zip(state["text"], state["image"])) if micro else []
        if micro:
            if len(state["text"]) != len(self.text.flats) or len(state["image"]) != len(self.image.flats):
                raise ValueError("state: the checkpoint's gradient buffers do not match this model's layout")
            for (t, i), mine in zip(flats, self.text.flats):
                if t.shape != mine.shape or i.shape != mine.shape or t.dtype != mine.dtype or i.dtype != mine.dtype:
                    raise ValueError("state: the checkpoint's gradient buffers do not match this model's layout")
        self.spec = spec
        self._reset()
        load_balancer_state(self.balancer, state.get("balancer"))
        if state.get("options") is not None:
            self.options.load_state_dict(state["options"])
        if micro:
            for (t, i), tf, imf in zip(flats, self.text.flats, self.image.flats):
                tf.copy_(t)
                imf.copy_(i)
            self.image.attach_as_grad(self.layout.params)
            self._micro = micro
            self._losses = state["losses"].to(self._losses)
            self._bad = state["nonfinite"].to(self._bad)
            self._scaled = bool(state["scaled"])

    def integrate_accumulated(self) -> StepReport:
        """Run the rule once on the accumulated gradients; the result is written into ``.grad``.

        Under DDP the communication hook has done the integration during the last backward;
        this only checks the (then globally known) losses and assembles the report.
        """
        if self._micro == 0:
            raise RuntimeError(
                "integrate_accumulated: no gradients accumulated since the last step; call backward()/accumulate() first"
            )
        step = self._sync.finish(self._losses, self._settle)
        report = StepReport(self.layout, step, self._losses, self._micro, self.rule)
        self.last_report = report
        self._reset()
        return report

    def integrate(self) -> StepReport:
        """Deprecated name of :meth:`integrate_accumulated` (``integrate`` is the op's name)."""
        warnings.warn(
            "ParetoLoRA.integrate() is renamed integrate_accumulated(); the old name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.integrate_accumulated()

    def _settle(self, losses: torch.Tensor, integrated: bool) -> torch.Tensor | None:
        """The sync's ``settle``: record the (global) losses, then decide on a non-finite one.

        Returns a 0-d device bool (poison the step) in "skip" mode; in "raise" mode raises on a
        non-finite loss. ``integrated``: ``.grad`` already holds an integration (DDP hook); a
        refused step then leaves it NaN, so that an optimizer step after a caught exception
        cannot apply it.
        """
        self._losses = losses
        self._bad = self._bad | ~torch.isfinite(losses)
        mode = self.on_nonfinite
        if mode == "auto":
            mode = "skip" if self._scaled else "raise"
        if mode != "raise":
            return self._bad.any()
        bad = self._bad.tolist()
        if any(bad):
            values = self._losses.tolist()
            if integrated:
                self.image.fill_(math.nan)
            self._reset()
            which = " and ".join(n for n, b in zip(("text", "image"), bad) if b)
            raise FloatingPointError(
                f"{which} loss is not finite ({', '.join(f'{x}' for x in values)}); refusing to step. "
                "(Masked image-token logits, e.g. Chameleon's -inf, give an infinite image loss.) "
                "Use on_nonfinite='skip' with a GradScaler to skip such steps instead."
            )
        return None

    def describe(self) -> str:
        return self.layout.describe()

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
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings

import torch
from torch import nn

from .. import args
from ..backends import resolve_backend
from ..distributed import make_sync
from ..distributed.sync import set_traversal
from ..flat import FlatGrads, build_layout
from ..rules import LOOSE, RuleSpec, rule_keywords
from .balancers import Balancer, resolve_rule
from .balancers.base import balancer_state, check_balancer_state, load_balancer_state
from .checkpoint import check_state
from .multi_objective import MultiObjectiveLoRA
from .report import StepReport
from .rule_options import RuleOptions, check_optimizer
from .step_checks import NONFINITE_MODES, check_loss as _check_loss
from .watch import TrainableWatch
from .window import AccumulationWindow

__all__ = ["ParetoLoRA"]

def _owner_check(owner, state: dict, key: str) -> None:
    """The owner's own ``check_state`` (balancers, RuleOptions), where it has one: ValueError("state: ...")."""
    check = getattr(owner, "check_state", None)
    if check is None:
        return
    try:
        check(state)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("state: ") else f"state: {key}: {msg}") from None


class ParetoLoRA(AccumulationWindow):
    """Modality-balanced gradient integration for a PEFT LoRA model (two objectives: text, image).

    Args:
        model: a PEFT model (``peft.get_peft_model``) or any module with PEFT LoRA layers, or
            such a model wrapped by ``DistributedDataParallel`` or FSDP2 ``fully_shard``.
        rule: integration rule (``pareto_lora.RULES``) for the modulated groups, or a
            :class:`pareto_lora.RuleSpec` (then leave tau, gamma, symmetric, margin unset). Default:
            "pareto_lora", or "sum" with a balancer (the only kernel rule a balancer takes: its
            weights replace the rule). ``rule="mimo"`` / ``rule=MIMO(...)`` is shorthand for
            ``balancer=`` (kept for compatibility).
        balancer: a loss-weighting balancer: ``"mimo"``, ``"gradnorm"`` or a
            :mod:`pareto_lora.training.balancers` object such as ``MIMO(lam=20)`` (``self.balancer``).
        tau: imbalance threshold on ||g_text|| / ||g_image|| (default 0.5).
        num_groups: consecutive layer groups of the layer stack (``numpy.array_split`` sizes),
            ``"per_layer"``, or None (default): ``min(5, number of layers)``.
        modulate: groups that get the rule: "lower", "middle", "upper", "all", "none", the name
            of a group outside the layer stack ("projector"; with ``arch`` also e.g.
            "generation"), a group index (those groups follow the ``num_groups`` layer groups:
            the projector group is index ``num_groups``) or a list of them. Other groups, and
            non-LoRA trainable parameters, get g_text + g_image.
        gamma, symmetric, margin: rule parameters, one keyword per :class:`pareto_lora.RuleSpec`
            field (see ``pareto_lora.integrate``; default 1.0, False, 0.0); unset with a balancer.
        layers_path: name of the decoder-layer ModuleList when auto-detection cannot tell.
        arch: None (default: the stack is searched for; LoRA outside it is one "projector"
            group), "auto" (``pareto_lora.archs.detect_arch(model)``) or a
            :class:`pareto_lora.archs.ArchSpec`: the stack and the named groups outside it come
            from the architecture (Janus: "generation" and "projector"). ``self.arch`` holds it.
        stats_ema: None, or beta in [0, 1): the rule sees an exponential moving average of each
            group's statistics (a non-finite step never enters it). Kernel rules only.
        preserve_norm: scale each group's (alpha, beta) so that the output keeps ||g_text + g_image||
            (a combination the statistics cannot resolve, near a Pareto-stationary pair, is not
            scaled up; see :func:`pareto_lora.training.rule_options.preserve_norm_coeffs`).
        on_nonfinite: what a non-finite loss does at ``integrate_accumulated()``: "raise"
            (FloatingPointError), "skip" (NaN gradients, for a GradScaler to skip the step) or
            "auto" (skip when a scaler was passed to ``backward``, else raise).
        backend: backend of the integration ops (``pareto_lora.available_backends()``).
        traversal: how the two gradients are taken (:mod:`pareto_lora.distributed.traversal`):
            "auto" (default: one batched backward under activation checkpointing, else two
            passes), "two_pass", "batched", or "sum_first" (opt-in: text only as deep as the
            modulated groups; one process only). DDP and FSDP2 take "two_pass" and "batched".
        objectives: names of K objectives, e.g. ``("text", "understanding", "generation")``: then
            ``ParetoLoRA(...)`` returns a :class:`pareto_lora.training.multi_objective.MultiObjectiveLoRA`
            (``pl.backward(**losses)``); None or ``("text", "image")``: this two-objective step.
    """

    _num_losses = 2  # text, image: the accumulation window's running losses

    def __new__(cls, *args, objectives=None, **kwargs):
        # Objectives other than (text, image): the K-objective step; ParetoLoRA stays the two-objective one.
        if objectives is None or (isinstance(objectives, (tuple, list)) and tuple(objectives) == ("text", "image")):
            return super().__new__(cls)
        return MultiObjectiveLoRA(*args, objectives=objectives, **kwargs)

    @rule_keywords(collect="rule_params")  # tau after rule, the other RuleSpec fields after the star
    def __init__(
        self,
        model: nn.Module,
        rule: str | RuleSpec | Balancer | None = None,
        num_groups: int | str | None = None,
        modulate="lower",
        *,
        rule_params: dict,
        balancer: str | Balancer | None = None,
        layers_path: str | None = None,
        arch=None,
        stats_ema: float | None = None,
        preserve_norm: bool = False,
        on_nonfinite: str = "auto",
        backend: str = "auto",
        traversal: str = "auto",
        objectives=None,  # None or ("text", "image"); any other returns a MultiObjectiveLoRA (__new__)
    ):
        # The rule's parameters become one validated RuleSpec here, once; each step reuses it.
        # A balancer (MIMO, GradNorm) wraps the sync; the kernel rule underneath is then "sum".
        self.balancer, self.spec = resolve_rule(rule, balancer, **rule_params)
        args.choice("on_nonfinite", on_nonfinite, NONFINITE_MODES)
        self.options = RuleOptions(stats_ema, preserve_norm)
        if self.options.enabled and self.balancer is not None:
            raise ValueError("stats_ema, preserve_norm: expected a kernel rule; they do not apply to a balancer")
        self._sync = make_sync(model)
        set_traversal(self._sync, traversal, balanced=self.balancer is not None)
        if self.options.stats_ema and not self._sync.calls_rule_once:
            raise ValueError("stats_ema: not supported under DDP yet (the hook runs the rule group by group)")
        if self.balancer is not None:
            self._sync = self.balancer.wrap_sync(self._sync)
        layout = build_layout(self._sync.module, num_groups=num_groups, modulate=modulate, layers_path=layers_path,
                              arch=arch)
        self.layout = self._sync.layout_for(layout)
        self.arch = layout.arch  # the ArchSpec (paths in the model inside any DDP wrapper), or None
        self._impl = resolve_backend(backend, self.layout.device)  # the kernel rule's backend, resolved once
        self.on_nonfinite, self.backend = on_nonfinite, backend
        self.options.bind(self.layout.num_groups)
        self.text = FlatGrads(self.layout)
        self.image = FlatGrads(self.layout)
        # The sync reads the rule from here at every step: self.spec (fused into the integrate op),
        # or python_rule where options need the statistics first.
        self._sync.bind(self.layout, self.text, self.image, self, backend)
        # Every parameter, whether it trained, and the laid-out ones' dtype and device: compared each step.
        self._watch = TrainableWatch(self._sync.module, self.layout.params, self.layout.names)
        self.last_report: StepReport | None = None
        self._reset()

    # The rule's parameters, read from the one RuleSpec (assign ``spec`` to change them).
    @property
    def spec(self) -> RuleSpec:
        """The kernel rule (a validated :class:`pareto_lora.RuleSpec`; ``sum`` under a balancer)."""
        return self._spec

    @spec.setter
    def spec(self, spec: RuleSpec) -> None:
        if not isinstance(spec, RuleSpec):
            raise ValueError(f"spec: expected a pareto_lora.RuleSpec, got {type(spec).__name__}")
        if self.balancer is not None and spec.name != "sum":
            raise ValueError(f"spec: expected the 'sum' rule under the {self.balancer.name!r} balancer, "
                             f"got {spec.name!r}")
        self._spec = spec

    @property
    def rule(self) -> str:
        return self.balancer.name if self.balancer is not None else self.spec.name

    @property
    def python_rule(self):
        """The rule as a Python function of the group statistics where the options (stats_ema,
        preserve_norm) need them before the coefficients; None: ``spec`` runs inside the fused op."""
        return self._rule if self.options.enabled else None

    def _rule(self, group_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coeffs, cases) of every group under the current settings (called by the sync, after settle)."""
        return self.options.apply(group_stats, self._kernel_rule, skipped=self._skipped())

    def _kernel_rule(self, group_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._impl.rule_coefficients(group_stats, self.spec, active=self.layout.active)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Warn when this rule can lengthen the gradient and `optimizer` (SGD) steps in proportion."""
        return check_optimizer(optimizer, self.spec, self.options.preserve_norm) if self.balancer is None else None

    def accumulate(self, text: torch.Tensor, image: torch.Tensor, scaler=None) -> None:
        """Add one micro-batch's text and image gradients to their buffers (no integration)."""
        self.backward(text=text, image=image, step=False, scaler=scaler)

    def backward(self, text: torch.Tensor, image: torch.Tensor, step: bool = True, scaler=None) -> StepReport | None:
        """Backpropagate both objectives of one forward pass; with ``step=True`` also integrate.

        ``scaler``: an optional ``torch.amp.GradScaler``; both losses are scaled by it.
        Returns the :class:`StepReport` when ``step`` is true, else None.
        """
        args.flag("step", step)
        _check_loss("text", text)
        _check_loss("image", image)
        self._check_trainable()
        t_loss, i_loss = (scaler.scale(text), scaler.scale(image)) if scaler is not None else (text, image)
        batch = torch.stack([text.detach(), image.detach()]).reshape(2).to(torch.float64)
        self._add_micro_batch(batch, scaler is not None,
                              lambda losses: self._sync.backward(t_loss, i_loss, first=self._micro == 0, losses=losses))
        return self.integrate_accumulated() if step else None

    def _check_trainable(self) -> None:
        """The parameters that require grad must still be the ones laid out when this was built, with
        the same dtype and device: a newly unfrozen weight would get g_image only, a newly frozen one
        no gradient at all, a replaced one (or ``model.to(torch.float64)``) would miss the buffers."""
        self._watch.check()

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
        """Restore :meth:`state_dict`; the whole state is checked before anything changes
        (ValueError("state: ...") on a missing key, a wrong type or shape)."""
        checked = check_state(state, self.text.flats, self._sync.saves_mid_window)
        entry = state.get("balancer")
        check_balancer_state(self.balancer, entry)
        if self.balancer is not None and entry is not None:
            if not isinstance(entry.get("state"), dict):
                raise ValueError("state: balancer: expected a dict with the balancer's 'state'")
            window = entry.get("window_losses")
            if window is not None and not (isinstance(window, torch.Tensor) and tuple(window.shape) == (2,)):
                raise ValueError("state: balancer: window_losses: expected None or a Tensor of shape [2]")
            _owner_check(self.balancer, entry["state"], "balancer")
        if state.get("options") is not None:
            _owner_check(self.options, state["options"], "options")
        # Everything is checked: from here on nothing can fail half-way.
        self.spec = checked.spec
        self._reset()
        load_balancer_state(self.balancer, entry)
        if state.get("options") is not None:
            self.options.load_state_dict(state["options"])
        if checked.micro:
            for (t, i), tf, imf in zip(checked.flats, self.text.flats, self.image.flats):
                tf.copy_(t)
                imf.copy_(i)
            self.image.attach_as_grad(self.layout.params)
            self._micro = checked.micro
            self._losses = checked.losses.to(self._losses)
            self._bad = checked.nonfinite.to(self._bad)
            self._scaled = checked.scaled

    def integrate_accumulated(self) -> StepReport:
        """Run the rule once on the accumulated gradients; the result is written into ``.grad``.

        Under DDP the communication hook has done the integration during the last backward;
        this only checks the (then globally known) losses and assembles the report.
        """
        if self._micro == 0:
            raise RuntimeError(
                "integrate_accumulated: no gradients accumulated since the last step; call backward()/accumulate() first"
            )
        self._check_trainable()  # a model.to(dtype) since the last backward would break attach_as_grad
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
        if self._nonfinite_mode(losses) != "raise":
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


# __new__ only dispatches on objectives: the signature that help() and inspect show is __init__'s.
ParetoLoRA.__signature__ = inspect.signature(ParetoLoRA.__init__).replace(
    parameters=list(inspect.signature(ParetoLoRA.__init__).parameters.values())[1:])
# The rule's parameters, read from the one RuleSpec (pl.tau, pl.margin, ...): one per field.
for _name in LOOSE:
    setattr(ParetoLoRA, _name, property(lambda self, _n=_name: getattr(self.spec, _n), doc=f"``spec.{_name}``"))
del _name

"""K objectives on a PEFT LoRA model, one process: what ``ParetoLoRA(objectives=...)`` builds.

Typical use (Janus, a mixed batch; :mod:`pareto_lora.archs.objectives`)::

    pl = pareto_lora.ParetoLoRA(model, rule="mean", arch="auto", objectives=("text", "understanding", "generation"))
    report = pl.backward(**pareto_lora.archs.objective_losses_for(model, batch, pl.arch))
    optimizer.step(); optimizer.zero_grad()

``ParetoLoRA`` with ``objectives`` other than ``("text", "image")`` returns a
:class:`MultiObjectiveLoRA`; without it (or with exactly those two names) it is the two-objective
step, unchanged. The losses are given by name, ``pl.backward(**losses)`` or
``pl.backward(losses={...})``, every objective every time (a kind absent from a batch is a zero
loss that still requires grad, as :func:`~pareto_lora.archs.objective_losses_for` returns it).

Gradient storage: one persistent :class:`~pareto_lora.flat.FlatGrads` per objective over the same
layout (K x the trainable size). Each backward takes the K gradients with ``torch.autograd.grad``
(K passes over the graph, the first K - 1 keeping it) and only once all K exist adds them into
their buffers, as the two-objective single-process step does: a backward that fails (a loss that
reaches no LoRA parameter, a freed graph) leaves ``.grad`` and the accumulation as they were.
(DDP, FSDP2: the sync of :mod:`pareto_lora.distributed.multi` / ``.multi_fsdp`` takes them;
under DDP a failure once the last objective's backward has started loses the window, SyncFailure.)
``.grad`` views the last objective's buffer, into which :func:`pareto_lora.integrate_many` writes
the result: Gram per unit -> the weighting per group (``layout.active`` groups; the others get the
plain sum, case INACTIVE) -> combine.

Gradient accumulation (``step=False`` / :meth:`accumulate`, then :meth:`integrate_accumulated`),
a GradScaler (every loss scaled by the same factor; a non-finite gradient makes its group
NONFINITE, plain sum, so the inf reaches the scaler), non-finite losses (``on_nonfinite``) and
checkpoints (:meth:`state_dict`, checked whole before anything is loaded) work as in the
two-objective step. Several processes: pass the ``DistributedDataParallel`` model (a
communication hook averages all K gradients; keep DDP's defaults ``gradient_as_bucket_view=False``
and ``static_graph=False``;
``no_sync()`` accumulation works, the last micro-batch outside it) or an FSDP2 ``fully_shard``
model: every rank gets the integration of the global batch, ranks bitwise equal
(:mod:`pareto_lora.distributed.multi`). ``stats_ema`` (the weighting sees an average over steps of
each group's K x K Gram) and ``preserve_norm`` (each group's weights rescaled so that the output
keeps ||sum_k g_k||) as for two objectives (:class:`~pareto_lora.training.rule_options.RuleOptions`),
under DDP too: the rule runs once per step here. ``traversal``: as for two objectives, "auto" takes
one batched backward of the K losses under non-reentrant activation checkpointing (one process and
DDP; FSDP2 takes K passes). Not here: balancers (two-objective by construction) and
``traversal="sum_first"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import args
from ..backends import resolve_backend
from ..distributed.multi import set_many_traversal
from ..distributed.select import make_many_sync
from ..flat import FlatGrads, build_layout, check_buffers_fit
from ..multi import MAX_OBJECTIVES, gram_matrix
from ..multi.weightings import K_RULES, check_rule, is_user_weighting, weigh
from ..rules import RuleSpec, as_spec, rule_keywords
from .multi_report import MultiStepReport
from .rule_options import RuleOptions, check_optimizer
from .step_checks import NONFINITE_MODES, check_loss
from .watch import TrainableWatch
from .window import AccumulationWindow

__all__ = ["MultiObjectiveLoRA", "check_objectives"]

#: Keywords of backward(): no objective may take their name.
_RESERVED = ("losses", "step", "scaler")


def check_objectives(objectives) -> tuple[str, ...]:
    """2 to MAX_OBJECTIVES distinct identifiers (the keywords of ``backward``); a tuple."""
    if isinstance(objectives, (str, bytes)) or not isinstance(objectives, Sequence):
        raise ValueError(f"objectives: expected a tuple of 2 to {MAX_OBJECTIVES} names, got {objectives!r}")
    names = tuple(objectives)
    if not 2 <= len(names) <= MAX_OBJECTIVES:
        raise ValueError(f"objectives: expected 2 to {MAX_OBJECTIVES} names, got {len(names)}")
    for n in names:
        if not isinstance(n, str) or not n.isidentifier() or n in _RESERVED:
            raise ValueError(f"objectives: expected names that are Python identifiers other than "
                             f"{', '.join(_RESERVED)}, got {n!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"objectives: expected distinct names, got {names}")
    return names


def _refuse_two_objective_options(balancer, traversal) -> None:
    if balancer is not None:
        raise ValueError("balancer: not supported with K objectives (a balancer weights the text and image losses: "
                         "two-objective ParetoLoRA only)")
    if traversal == "sum_first":  # the others: set_many_traversal
        raise ValueError("traversal: 'sum_first' is not supported with K objectives (two-objective ParetoLoRA only)")


class MultiObjectiveLoRA(AccumulationWindow):
    """Gradient integration of K objectives (2 <= K <= 8) for a PEFT LoRA model, one process.

    Args: those of :class:`~pareto_lora.ParetoLoRA` (``model``, ``num_groups``, ``modulate``,
    ``layers_path``, ``arch``, ``on_nonfinite``, ``backend``: every backend has the K-objective
    kernels ``gram`` and ``combine_many``; ``stats_ema``, ``preserve_norm``: on the K x K Gram,
    see docs/objectives.md), and
        rule: a K-objective rule (:data:`pareto_lora.multi.weightings.K_RULES`; default "mean")
            with its parameters as keywords (``weights=(...)``, one per objective, for
            "constant"), or a :class:`~pareto_lora.RuleSpec`.
        objectives: the objectives' names, in order: the keywords of :meth:`backward` and the
            order of the weights. The last one's buffer is ``.grad``.
    """

    @rule_keywords(collect="rule_params")
    def __init__(self, model: nn.Module, rule: str | RuleSpec | None = None, num_groups=None, modulate="lower", *,
                 rule_params: dict, objectives, layers_path: str | None = None, arch=None, on_nonfinite: str = "auto",
                 backend: str = "auto", balancer=None, stats_ema=None, preserve_norm: bool = False,
                 traversal: str = "auto"):
        self.objectives = check_objectives(objectives)
        _refuse_two_objective_options(balancer, traversal)
        self.options = RuleOptions(stats_ema, preserve_norm)
        if is_user_weighting(rule) and not isinstance(rule, (str, RuleSpec)):
            given = [k for k, v in rule_params.items() if v is not None]
            if given:
                raise ValueError(f"{given[0]}: expected no rule parameters with a user-defined weighting")
            self.spec = rule
        elif rule is not None and not isinstance(rule, (str, RuleSpec)):
            raise ValueError(f"rule: expected one of {', '.join(K_RULES)}, a RuleSpec or a user-defined weighting "
                             f"(a callable on the batched Gram), got {type(rule).__name__}")
        else:
            self.spec = as_spec("mean" if rule is None else rule, **rule_params)
        args.choice("on_nonfinite", on_nonfinite, NONFINITE_MODES)
        self._sync = make_many_sync(model)
        set_many_traversal(self._sync, traversal)
        layout = build_layout(self._sync.module, num_groups=num_groups, modulate=modulate, layers_path=layers_path,
                              arch=arch)
        self.layout = self._sync.layout_for(layout)  # FSDP2: this rank's shards
        resolve_backend(backend, self.layout.device)  # an unknown or unusable backend: refused here, by name
        self.module, self.arch, self.backend, self.on_nonfinite = model, layout.arch, backend, on_nonfinite
        check_buffers_fit(self.layout, len(self.objectives), "objectives")  # a clear error, not an allocator's
        self.options.bind(self.layout.num_groups, len(self.objectives))
        # The weights' dtype, that of integrate_many on the first bucket (float64 on float64 buffers only).
        self._dtype = torch.float64 if self.layout.buckets[0].dtype == torch.float64 else torch.float32
        self.grads = tuple(FlatGrads(self.layout) for _ in self.objectives)
        self._sync.bind(self.layout, self.grads, self.objectives, backend)
        self._watch = TrainableWatch(self._sync.module, self.layout.params, self.layout.names)
        self.last_report: MultiStepReport | None = None
        self._reset()

    @property
    def spec(self):
        """The K-objective rule: a RuleSpec or a user-defined weighting (assign one to change it between steps)."""
        return self._spec

    @spec.setter
    def spec(self, spec) -> None:
        if not isinstance(spec, RuleSpec) and not is_user_weighting(spec):
            raise ValueError(f"spec: expected a pareto_lora.RuleSpec or a user-defined weighting, got {type(spec).__name__}")
        check_rule(spec, len(self.objectives))
        self._spec = spec

    @property
    def rule(self) -> str:
        """The rule's name; ``"user"`` for a user-defined weighting."""
        return self.spec.name if isinstance(self.spec, RuleSpec) else "user"

    @property
    def python_rule(self):
        """The rule as a function of the group Gram rows where the options (stats_ema, preserve_norm)
        need them before the weights; None: ``spec`` runs inside ``integrate_many``."""
        return self._rule if self.options.enabled else None

    def _rule(self, group_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.options.apply(group_stats, self._weigh, skipped=self._skipped())

    def _weigh(self, group_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weigh(self.spec, gram_matrix(group_stats, len(self.objectives)), self.layout.active, self._dtype)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Warn when this rule can lengthen the gradient (beyond the plain sum of the K) and `optimizer`
        (SGD) steps in proportion: :func:`~pareto_lora.training.rule_options.check_optimizer`, as for two."""
        return check_optimizer(optimizer, self.spec, self.options.preserve_norm, len(self.objectives))

    def describe(self) -> str:
        return self.layout.describe()

    @property
    def _num_losses(self) -> int:  # the accumulation window's running losses: one per objective
        return len(self.objectives)

    # ---- the step --------------------------------------------------------------------------------
    def _named(self, losses, named: dict) -> list[torch.Tensor]:
        if losses is not None and named:
            raise ValueError("losses: expected either losses={...} or the losses as keywords, not both")
        if losses is None:
            losses = named
        if not isinstance(losses, Mapping):
            raise ValueError(f"losses: expected a dict of objective name -> loss, got {type(losses).__name__}")
        if set(losses) != set(self.objectives):
            missing = [n for n in self.objectives if n not in losses]
            extra = sorted(str(n) for n in losses if n not in self.objectives)
            raise ValueError(f"losses: expected one loss per objective ({', '.join(self.objectives)}); "
                             f"missing {missing}, unknown {extra}")
        for n in self.objectives:
            check_loss(n, losses[n])
        return [losses[n] for n in self.objectives]

    def accumulate(self, losses: Mapping | None = None, scaler=None, **named) -> None:
        """Add one micro-batch's K gradients to their buffers (no integration)."""
        self.backward(losses, step=False, scaler=scaler, **named)

    def backward(self, losses: Mapping | None = None, step: bool = True, scaler=None, **named):
        """Backpropagate the K objectives of one forward pass; with ``step=True`` also integrate.

        ``losses={name: loss}`` or ``name=loss`` keywords, one per objective. ``scaler``: an optional
        ``torch.amp.GradScaler`` (every loss scaled by it). Returns the :class:`MultiStepReport`
        when ``step`` is true, else None.
        """
        values = self._named(losses, named)
        args.flag("step", step)
        self._watch.check()
        batch = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values])
        scaled = [scaler.scale(v) for v in values] if scaler is not None else values
        self._add_micro_batch(batch, scaler is not None, lambda _: self._sync.backward(scaled, first=self._micro == 0))
        return self.integrate_accumulated() if step else None

    def integrate_accumulated(self) -> MultiStepReport:
        """Run the rule once on the accumulated gradients; the result is written into ``.grad``."""
        if self._micro == 0:
            raise RuntimeError("integrate_accumulated: no gradients accumulated since the last step; "
                               "call backward()/accumulate() first")
        self._watch.check()
        # The sync makes the losses global (DDP, FSDP2), settles them, then integrates into .grad.
        r, losses = self._sync.finish(self._losses, self, self._settle)
        report = MultiStepReport(self.layout, self.objectives, r.stats, r.group_stats, r.weights, r.cases, losses,
                                 self._micro, self.rule)
        self.last_report = report
        self._reset()
        return report

    def _settle(self, losses: torch.Tensor) -> torch.Tensor | None:
        """Poison (0-d bool, "skip") or raise ("raise") on a non-finite accumulated (global) loss."""
        if self._nonfinite_mode(losses) == "skip":
            return self._bad.any()
        bad = self._bad.tolist()
        if any(bad):
            values = self._losses.tolist()
            self._reset()
            which = " and ".join(n for n, b in zip(self.objectives, bad) if b)
            raise FloatingPointError(f"{which} loss is not finite ({', '.join(map(str, values))}); refusing to step. "
                                     "Use on_nonfinite='skip' with a GradScaler to skip such steps instead.")
        return None

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The rule, the objectives and, mid-accumulation, every objective's buffers and running losses."""
        if self._micro and not self._sync.saves_mid_window:
            raise RuntimeError("state_dict: under DDP the accumulated gradients are this rank's un-averaged part; save "
                               "between steps (after integrate_accumulated()), as the Trainer does")
        window = self._micro > 0
        return {
            "version": 1,
            "objectives": list(self.objectives),
            # A user weighting is code, not state: the checkpoint says so and a resume must pass it again.
            "rule": dataclasses.asdict(self.spec) if isinstance(self.spec, RuleSpec) else {"user": True},
            "micro_batches": self._micro,
            "losses": self._losses.detach().cpu().clone(),
            "nonfinite": self._bad.detach().cpu().clone(),
            "scaled": self._scaled,
            "grads": [[f.detach().cpu().clone() for f in g.flats] for g in self.grads] if window else [],
            "options": self.options.state_dict(),  # the Gram's running average, if any
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the whole state is checked before anything changes
        (ValueError("state: ...") on a missing key, another objective list, a wrong type or shape)."""
        spec, micro, losses, bad, grads = self._check_state(state)
        self.spec = spec
        self._reset()
        self.options.load_state_dict(state.get("options"))  # checked by _check_state: cannot fail
        if micro:
            for buf, saved in zip(self.grads, grads):
                for f, s in zip(buf.flats, saved):
                    f.copy_(s)
            self._sync.reattach()
            self._micro, self._scaled = micro, state["scaled"]
            self._losses, self._bad = losses.to(self._losses), bad.to(self._bad)

    def _check_state(self, state):
        def fail(msg):
            raise ValueError(f"state: {msg}")

        keys = ("version", "objectives", "rule", "micro_batches", "losses", "nonfinite", "scaled", "grads")
        if not isinstance(state, dict) or state.get("version") != 1 or "objectives" not in state:
            fail("expected a K-objective ParetoLoRA.state_dict() (version 1, with 'objectives')")
        missing = [k for k in keys if k not in state]
        if missing:
            fail(f"missing key(s) {', '.join(map(repr, missing))}")
        if tuple(state["objectives"]) != self.objectives:
            fail(f"objectives: expected {list(self.objectives)}, got {state['objectives']!r}")
        if not isinstance(state["rule"], dict):
            fail(f"rule: expected a dict of RuleSpec fields, got {type(state['rule']).__name__}")
        if state["rule"] == {"user": True}:
            if isinstance(self.spec, RuleSpec):
                fail("rule: the checkpoint was saved with a user-defined weighting; pass it as rule= to resume")
            spec = self.spec  # a user weighting is code: the one this ParetoLoRA was given stays
        else:
            try:
                spec = RuleSpec(**state["rule"])
                check_rule(spec, len(self.objectives))
            except (TypeError, ValueError) as e:
                raise ValueError(f"state: rule: {str(e).removeprefix('rule: ')}") from None
        micro = state["micro_batches"]
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
            fail(f"micro_batches: expected an int >= 0, got {micro!r}")
        k = len(self.objectives)
        for key, dtypes in (("losses", (torch.float64, torch.float32)), ("nonfinite", (torch.bool,))):
            t = state[key]
            if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != (k,):
                fail(f"{key}: expected a Tensor of shape [{k}] (one per objective) and dtype "
                     f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)}")
        if not isinstance(state["scaled"], bool):
            fail(f"scaled: expected a bool, got {state['scaled']!r}")
        grads = state["grads"]
        mine = [g.flats for g in self.grads]
        if not isinstance(grads, (list, tuple)) or (micro and (len(grads) != k or any(
                not isinstance(s, (list, tuple)) or len(s) != len(m)
                or any(not isinstance(x, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype for x, y in zip(s, m))
                for s, m in zip(grads, mine)))):
            fail("grads: the checkpoint's gradient buffers do not match this model's layout")
        try:  # absent in a checkpoint from before the options: nothing to restore
            self.options.check_state(state.get("options"))
        except ValueError as e:
            raise ValueError(f"state: options: {str(e).removeprefix('state: ')}") from None
        return spec, micro, state["losses"], state["nonfinite"], grads

"""What a loss-weighting balancer is, and how ParetoLoRA runs one: :class:`Balancer`, :class:`BalancedSync`.

The kernel rules (``pareto_lora.RULES``) are closed-form in one group's three gradient
statistics, so one fused op runs them. The balancers here are not: their coefficients depend on
the losses and on state carried across steps (MIMO's loss floors, GradNorm's learned weights).
They therefore live above the kernels, as objects with state, and reach the training step through
the sync contract: :class:`BalancedSync` wraps whichever :class:`~pareto_lora.distributed.GradSync`
ParetoLoRA holds and

* replaces the rule function by the balancer's (coefficients per group into the flat step), or
* in one-backward mode (``balancer.one_backward``) backpropagates ``alpha*L_text + beta*L_image``
  once into ``.grad``, with weights known before the backward: a vanilla step's cost, and no
  per-group statistics (they read NaN in the report).

After each step the balancer sees the step (its group statistics and losses) to update its state,
and its quantities go into ``FlatStep.extra`` (``report.as_dict()`` keys ``pareto/<name>/...``).
"""

from __future__ import annotations

import math

import torch

from ... import ops
from ...flat import FlatStep, PythonRule
from ...flat.step import poison_cases
from ...rules import Case, RuleSpec

__all__ = ["Balancer", "BalancedSync", "weighted_coefficients", "single_process_only", "balancer_state",
           "check_balancer_state", "load_balancer_state"]

_SUM = RuleSpec("sum")


def weighted_coefficients(
    stats: torch.Tensor, active: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coeffs [G, 2], cases [G]): (alpha, beta) on the active groups, the plain sum elsewhere.

    The cases come from the kernel ``sum`` rule, so INACTIVE and NONFINITE mean what they mean
    for every rule (a non-finite group keeps the plain sum, so the NaN reaches the caller).
    ``alpha``, ``beta``: 0-d tensors (or [G] tensors, one weight per group).
    """
    coeffs, cases = ops.rule_coefficients(stats, _SUM, active=active, backend=backend)
    weighted = (cases == int(Case.SUMMED)) | (cases == int(Case.DEGENERATE))
    ab = torch.stack(torch.broadcast_tensors(alpha.to(coeffs), beta.to(coeffs)), dim=-1)
    return torch.where(weighted[:, None], ab.expand_as(coeffs), coeffs), cases


def describe(value) -> str:
    """A short description of a checkpoint entry for an error message (a tensor by shape and dtype)."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return "nothing" if value is None else type(value).__name__


def single_process_only(what: str) -> None:
    """ValueError when torch.distributed runs with several processes (not supported yet)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"rule: {what} runs in a single process for now (world size {dist.get_world_size()})")


class Balancer:
    """Base of the stateful loss-weighting methods (MIMO, GradNorm).

    Subclasses set ``name`` and implement :meth:`coefficients` (two-gradient path) or
    :meth:`loss_weights` (one-backward path), :meth:`observe`, :meth:`metrics` and the state.
    """

    name = "balancer"
    #: True: one backward of alpha*L_text + beta*L_image (weights from the losses alone).
    one_backward = False

    def check_bind(self, num_groups: int) -> None:
        """ValueError if this balancer cannot run on a layout of `num_groups` groups (nothing changes)."""

    def bind(self, device: torch.device, num_groups: int) -> None:
        """Called once by ParetoLoRA with the device of the gradients (creates the state there)."""
        self.check_bind(num_groups)
        self.device = device
        self.window_losses = torch.zeros(2, dtype=torch.float64, device=device)

    def loss_weights(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta) 0-d tensors for one backward, from this micro-batch's (text, image) losses."""
        raise NotImplementedError(f"{self.name}: no one-backward mode")

    def prepare(self, losses: torch.Tensor) -> None:
        """Two-gradient path: called with the step's (text, image) loss totals before the rule runs."""

    def coefficients(self, stats: torch.Tensor, active: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(coeffs [G, 2], cases [G]) of the two-gradient path."""
        raise NotImplementedError

    def observe(self, step: FlatStep, losses: torch.Tensor) -> None:
        """After the step: update the state from its statistics and losses."""

    def metrics(self) -> dict[str, torch.Tensor]:
        """After :meth:`observe`: this step's quantities, ``{"<name>/sigma_text": 0-d tensor, ...}`` (read by the report)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def check_state(self, state) -> None:
        """ValueError("state: ...") unless `state` is a :meth:`state_dict` of this balancer (changes nothing)."""
        if not isinstance(state, dict):
            raise ValueError(f"state: expected the {self.name} balancer's state dict, got {type(state).__name__}")

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the whole state is checked before any of it is applied."""
        self.check_state(state)
        self._load(state)

    def _load(self, state: dict) -> None:
        """Apply a checked state (subclasses)."""

    def snapshot(self):
        """The state :meth:`loss_weights` changes, to :meth:`restore` if the backward fails (no host sync)."""
        return None

    def restore(self, snap, when: torch.Tensor | None = None) -> None:
        """Put back a :meth:`snapshot` (``when``: a 0-d device bool, only where it is true)."""

    def wrap_sync(self, sync):
        """The sync ParetoLoRA uses with this balancer (one process only, for now)."""
        single_process_only(self.name)
        return BalancedSync(sync, self)


class BalancedSync:
    """A :class:`~pareto_lora.distributed.GradSync` that runs `balancer` around the `inner` sync.

    It implements the contract itself (no attribute forwarding): the flags are the inner sync's,
    ``bind`` puts the balancer's coefficients in place of the rule, ``backward`` and ``finish``
    add the one-backward mode and the balancer's update around the inner sync's.
    """

    def __init__(self, inner, balancer: Balancer):
        self.inner, self.balancer = inner, balancer
        self.module = inner.module
        self.saves_mid_window = inner.saves_mid_window
        self.calls_rule_once = inner.calls_rule_once

    def layout_for(self, layout):
        return self.inner.layout_for(layout)

    def bind(self, layout, text, image, rule_fn, backend: str) -> None:
        self.layout, self.image, self.backend = layout, image, backend
        self.balancer.bind(layout.device, layout.num_groups)
        self._weights = (torch.ones((), dtype=torch.float64, device=layout.device),) * 2
        self._start = None  # the balancer's state when the window began (one-backward mode)
        self.inner.bind(layout, text, image, PythonRule(self._rule), backend)

    def _rule(self, group_stats: torch.Tensor):
        return self.balancer.coefficients(group_stats, self.layout.active, self.backend)

    def backward(self, text_loss: torch.Tensor, image_loss: torch.Tensor, first: bool, losses: torch.Tensor) -> None:
        if not self.balancer.one_backward:
            self.inner.backward(text_loss, image_loss, first, losses)
            return
        # this micro-batch's unscaled losses: the running totals minus those before it
        params, bal = self.layout.params, self.balancer
        if not first:
            self.image.check_attached(params)
        batch = losses - (0 if first else bal.window_losses)
        saved = bal.snapshot()
        alpha, beta = bal.loss_weights(batch)
        try:  # like the two-gradient path: nothing changes unless the backward succeeds
            grads = torch.autograd.grad(alpha.to(text_loss.dtype) * text_loss + beta.to(image_loss.dtype) * image_loss,
                                        params, allow_unused=True)
        except BaseException:
            bal.restore(saved)
            raise
        self.image.accumulate(grads, first)
        self.image.attach_as_grad(params)
        bal.window_losses, self._weights = losses, (alpha, beta)
        if first:
            self._start = saved

    def finish(self, losses: torch.Tensor, settle) -> FlatStep:
        bal = self.balancer
        start = self._start if bal.one_backward else bal.snapshot()
        self._start = None

        def guarded(losses: torch.Tensor, integrated: bool):
            # A refused step (settle raises) or a skipped one (poison) leaves the balancer as it
            # was when the window began: its floors must not learn from a loss that was refused.
            try:
                poison = settle(losses, integrated)
            except BaseException:
                if start is not None:
                    bal.restore(start)
                raise
            if poison is not None and start is not None:
                bal.restore(start, when=poison)
            return poison

        if bal.one_backward:
            step = self._one_backward_step(losses, guarded)
        else:
            bal.prepare(losses)
            step = self.inner.finish(losses, guarded)
        bal.observe(step, losses)
        step.extra = {k: v.detach().clone() for k, v in self.balancer.metrics().items()}
        return step

    def _one_backward_step(self, losses: torch.Tensor, settle) -> FlatStep:
        """``.grad`` holds the weighted gradient already; report NaN statistics (none were taken)."""
        poison = settle(losses, False)
        lay, dev = self.layout, self.layout.device
        g = lay.num_groups
        coeffs = torch.stack(self._weights).to(torch.float32).expand(g, 2).clone()
        cases = torch.full((g,), int(Case.SUMMED), dtype=torch.int32, device=dev)
        if poison is not None:
            factor = torch.where(poison, math.nan, 1.0)
            for flat in self.image.flats:
                flat.mul_(factor.to(flat.dtype))
            cases = poison_cases(cases, poison)
        self.image.attach_as_grad(lay.params)  # even if a zero_grad() detached them
        nan = lambda n: torch.full((n, 3), math.nan, dtype=torch.float64, device=dev)  # noqa: E731
        return FlatStep(nan(lay.num_units), nan(g), coeffs, cases)


def balancer_state(balancer: Balancer | None) -> dict | None:
    """The ``"balancer"`` entry of ``ParetoLoRA.state_dict()``: name, state and the window's losses."""
    if balancer is None:
        return None
    window = getattr(balancer, "window_losses", None)
    return {"name": balancer.name, "state": balancer.state_dict(),
            "window_losses": None if window is None else window.detach().cpu().clone()}


def check_balancer_state(balancer: Balancer | None, entry) -> None:
    """ValueError("state: ...") unless a checkpoint's ``"balancer"`` entry fits this ParetoLoRA's
    balancer, checked whole (its own state included); nothing changes."""
    mine = None if balancer is None else balancer.name
    if entry is not None and not isinstance(entry, dict):
        raise ValueError(f"state: expected the balancer entry as a dict or None, got {type(entry).__name__}")
    theirs = None if entry is None else entry.get("name")
    if mine != theirs:
        raise ValueError(f"state: the checkpoint was saved with balancer {theirs!r}, this ParetoLoRA has {mine!r}")
    if balancer is None:
        return
    balancer.check_state(entry.get("state"))
    window = entry.get("window_losses")
    if window is not None and (not isinstance(window, torch.Tensor) or window.shape != (2,)
                               or not window.is_floating_point()):
        raise ValueError(f"state: expected the balancer's window_losses as a float tensor of shape [2], "
                         f"got {describe(window)}")


def load_balancer_state(balancer: Balancer | None, entry: dict | None) -> None:
    """Apply an entry that :func:`check_balancer_state` accepted."""
    if balancer is None or entry is None:
        return
    balancer.load_state_dict(entry["state"])
    if entry.get("window_losses") is not None:
        balancer.window_losses = entry["window_losses"].to(dtype=torch.float64, device=balancer.device).clone()

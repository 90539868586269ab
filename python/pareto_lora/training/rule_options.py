"""Options around the closed-form rule that the paper does not have (issue 13): statistics
smoothed over steps (an EMA of each group's ||a||^2, ||b||^2, a.b, so that a noise-level cosine in
one step does not flip the conflict branch), a norm-preserving mode (each group's (alpha, beta)
scaled so that ||alpha a + beta b|| = ||a + b||, for optimizers whose step grows with the gradient),
and the check that warns when a norm-increasing rule meets such an optimizer.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Callable

import torch

from .. import args
from ..multi import gram_matrix, num_pairs
from ..rules import STATIONARY_REL, RuleSpec

__all__ = ["RuleOptions", "preserve_norm_coeffs", "preserve_norm_weights", "check_optimizer", "can_lengthen",
           "NEVER_LONGER", "LONGER_FROM_THREE"]

#: rules whose output is never longer than the plain sum ||sum_k g_k|| (two objectives: ||a + b||), at any K
#: (up to rounding): sum (equal), mean (1/K of it), mgda and pareto_only's conflict branch (a point of the
#: convex hull: at most ||mean||), dualproj (the mean projected onto a convex cone), aligned_mtl
#: (||out||^2 = lambda_r/K^2 sum_kept (v^T 1)^2 <= 1^T G 1 / K^2), config (||out|| = |t . sum_k g_k|, t a unit vector).
NEVER_LONGER = ("sum", "mean", "mgda", "pareto_only", "dualproj", "aligned_mtl", "config")
#: never longer at two objectives, can be from three on. K = 2: upgrad's ||out||^2 = sin^2 (1 + t^2 + 2t|cos|)/4
#: <= ||a + b||^2 (||a|| = 1, ||b|| = t, cos < 0, reg_eps = 0; measured with reg_eps > 0), imtl_g's ||out|| =
#: ||a|| ||b|| ||a^ + b^|| / (||a|| + ||b||) <= ||a + b||. K >= 3, where the K gradients nearly cancel (their sum
#: 1e-6 of them): imtl_g's output stays near max_k ||g_k||, upgrad's (reg_eps > 0) near reg_eps-sized, both far
#: longer (tests/training/test_rule_options.py). upgrad with reg_eps = 0 was not found longer, but has no
#: bound either: it counts as can, as the safe side of a warning.
LONGER_FROM_THREE = ("upgrad", "imtl_g")
# Optimizers whose update is (nearly) invariant to the gradient's scale: a rule that rescales the
# gradient changes their direction mix, not their step size. SGD's step is proportional to it.
_SCALE_INVARIANT = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Adafactor")


def _sum(terms):
    """Left-to-right sum (no leading 0.0: at K = 2 the bits of the two-objective expressions)."""
    return functools.reduce(operator.add, terms)


def preserve_norm_weights(weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """K weights per row scaled so that ||sum_k w_k g_k|| = ||sum_k g_k||, from each row's K x K Gram
    ([G, K, K]) alone; a zero combination (Pareto-stationary) or a zero sum stays as it is.

    The norm kept is that of the plain sum (rule ``sum``, vanilla LoRA on the summed losses), the
    two-objective ||a + b|| at K = 2, where this computes :func:`preserve_norm_coeffs` bit for bit.
    The Gram carries a relative error up to eps = ``STATS_REL_ERR``, so ``now`` = ||sum w_k g_k||^2
    computed from it is off by up to eps (sum |w_k| ||g_k||)^2 and ``want`` = ||sum g_k||^2 by up
    to eps (sum ||g_k||)^2. Near a Pareto-stationary point (MGDA's min-norm point) that error is all
    there is, and sqrt(want / now) would blow rounding noise up (weights ~1e8). So, with the cut of
    ``mmpareto`` (``STATIONARY_REL``): a combination whose ``now`` the Gram does not resolve is not
    scaled; where ``want`` is not resolved it is never scaled up. Where both are resolved each is
    known to 1/16, hence

        ||out|| <= max(1.065 ||sum_k g_k||, ||sum_k w_k g_k||)

    (plus the float32 rounding of the stored weights): never longer than both the plain sum and
    the rule's own output. Rows with a non-finite Gram or weight keep their weights.
    """
    g, w = gram.to(torch.float64), weights.to(torch.float64)
    k = w.shape[-1]
    diag = [g[:, i, i] for i in range(k)]
    off = [(i, j) for i in range(k) for j in range(i + 1, k)]
    now = _sum(w[:, i] * w[:, i] * diag[i] for i in range(k)) + _sum(2.0 * w[:, i] * w[:, j] * g[:, i, j] for i, j in off)
    want = (_sum(diag) + 2.0 * _sum(g[:, i, j] for i, j in off)).clamp_min(0.0)
    norms = [d.clamp_min(0.0).sqrt() for d in diag]
    now_known = now > STATIONARY_REL * _sum(w[:, i].abs() * norms[i] for i in range(k)) ** 2
    want_known = want > STATIONARY_REL * _sum(norms) ** 2
    factor = torch.where(now_known, (want / torch.where(now_known, now, 1.0)).sqrt(), 1.0)
    factor = torch.where(want_known, factor, factor.clamp_max(1.0))
    factor = torch.where(torch.isfinite(factor), factor, 1.0)  # NONFINITE rows keep their plain sum
    return (w * factor[:, None]).to(weights.dtype)


def preserve_norm_coeffs(coeffs: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """(alpha, beta) per row scaled so that ||alpha a + beta b|| = ||a + b||, from the statistics
    ([G, 3]: ||a||^2, ||b||^2, a.b) alone: :func:`preserve_norm_weights` at K = 2 (its bound)."""
    s = stats.to(torch.float64)
    gram = torch.stack([s[:, 0], s[:, 2], s[:, 2], s[:, 1]], dim=1).reshape(-1, 2, 2)
    return preserve_norm_weights(coeffs, gram)


class RuleOptions:
    """``stats_ema`` (None or beta in [0, 1): the rule sees beta * previous + (1 - beta) * current
    statistics, finite rows only) and ``preserve_norm`` (bool). Called once per step.

    The running average starts per group at the group's first finite statistics: a non-finite
    step (a GradScaler overflow) reaches the rule as it is (NONFINITE) and never enters the average,
    nor does a step the owner skips for a non-finite loss (``skipped``) or refuses (the rule never runs).
    Two objectives: rows (||a||^2, ||b||^2, a.b). K objectives (:meth:`bind` with ``objectives=K``):
    rows of each group's K x K Gram (order of :func:`pareto_lora.multi.pairs`), the average of the
    Gram fed to the weighting, and the weights rescaled to ||sum_k g_k|| (:func:`preserve_norm_weights`).
    """

    def __init__(self, stats_ema: float | None = None, preserve_norm: bool = False):
        self.stats_ema = args.unit_interval("stats_ema", stats_ema, high_open=True, none=True)
        self.preserve_norm = args.flag("preserve_norm", preserve_norm)
        self.num_groups: int | None = None
        self.objectives: int | None = None
        self._ema: torch.Tensor | None = None  # [G, width]; a NaN row: no finite step seen yet

    def bind(self, num_groups: int, objectives: int | None = None) -> None:
        """The number of groups the statistics have and, for K objectives, K (checked in :meth:`check_state`)."""
        self.num_groups, self.objectives = num_groups, objectives

    @property
    def width(self) -> int:
        """Statistics per group: 3 (two objectives) or K(K+1)/2."""
        return 3 if self.objectives is None else num_pairs(self.objectives)

    @property
    def enabled(self) -> bool:
        return bool(self.stats_ema) or self.preserve_norm

    def apply(self, group_stats: torch.Tensor, rule_fn: Callable,
              skipped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``rule_fn`` on the (averaged) statistics; ``skipped``: a 0-d device bool, true where the owner
        skips the whole step (a non-finite loss, ``on_nonfinite="skip"``): its statistics may be finite,
        yet the step must leave the average as it was. Read on the device, no host sync; a skipped
        step before any average exists leaves an all-NaN one ("not seen yet", as None)."""
        stats = group_stats
        if self.stats_ema:
            beta = self.stats_ema
            finite = torch.isfinite(group_stats).all(dim=1, keepdim=True)
            ema = torch.full_like(group_stats, math.nan) if self._ema is None else self._ema.to(group_stats)
            prev = torch.where(torch.isnan(ema), group_stats, ema)  # a group's first finite step starts it
            blended = beta * prev + (1.0 - beta) * group_stats
            stats = torch.where(finite, blended, group_stats)
            enters = finite if skipped is None else finite & ~skipped
            ema = torch.where(enters, blended, ema).detach()
        coeffs, cases = rule_fn(stats)
        if self.preserve_norm:
            coeffs = self._preserve(coeffs, group_stats)
        if self.stats_ema:
            self._ema = ema  # only once the rule succeeded: a failed step leaves the average as it was
        return coeffs, cases

    def _preserve(self, coeffs: torch.Tensor, group_stats: torch.Tensor) -> torch.Tensor:
        if self.objectives is None:
            return preserve_norm_coeffs(coeffs, group_stats)
        return preserve_norm_weights(coeffs, gram_matrix(group_stats.to(torch.float64), self.objectives))

    def state_dict(self) -> dict:
        return {"stats_ema": self.stats_ema, "preserve_norm": self.preserve_norm,
                "ema": None if self._ema is None else self._ema.detach().cpu().clone()}

    def check_state(self, state) -> None:
        """ValueError("state: ...") unless `state` is a :meth:`state_dict` that fits (None: none saved)."""
        if state is None:
            return
        if not isinstance(state, dict) or "ema" not in state:
            raise ValueError(f"state: expected the options entry as a RuleOptions.state_dict(), got {state!r:.60}")
        ema = state["ema"]
        if ema is None:
            return
        want = (self.num_groups, self.width)
        if not isinstance(ema, torch.Tensor) or not ema.is_floating_point() or (
                self.num_groups is not None and tuple(ema.shape) != want):
            got = f"shape {list(ema.shape)}" if isinstance(ema, torch.Tensor) else type(ema).__name__
            raise ValueError(f"state: expected the stats_ema average as a float tensor of shape {list(want)}, "
                             f"got {got}")
        if torch.isinf(ema).any():
            raise ValueError("state: expected the stats_ema average finite (or NaN for a group not seen yet)")

    def load_state_dict(self, state) -> None:
        """Restore :meth:`state_dict` (None: nothing saved); the whole state is checked first."""
        self.check_state(state)
        if state is not None:
            ema = state["ema"]
            self._ema = None if ema is None else ema.to(torch.float64).clone()


def can_lengthen(spec, objectives: int = 2) -> bool:
    """Whether the rule's output can be longer than the plain sum of the `objectives` gradients (what
    vanilla LoRA on the summed losses steps along). Exact-arithmetic bounds, as ``mmpareto``'s
    gamma > 1 (docs/rules.md): cagrad's ||out|| <= (1 + c) ||mean_k g_k|| exceeds the sum only for
    c > K - 1; constant weights never lengthen only when equal and at most 1 in size (else g_1 = -g_2
    gives a zero sum and a non-zero output). pareto_lora and rescale_only (the RESCALED branch), pcgrad
    (projections of cancelling gradients) and nash_mtl (an output norm independent of the gradients'
    scale) can; so can a user-defined weighting, whose bound is unknown."""
    if not isinstance(spec, RuleSpec):
        return True
    name = spec.name
    if name in NEVER_LONGER:
        return False
    if name in LONGER_FROM_THREE:
        return objectives >= 3
    if name == "cagrad":
        return spec.c > objectives - 1
    if name == "mmpareto":
        return spec.gamma > 1.0
    if name == "constant":
        return len(set(spec.weights)) > 1 or abs(spec.weights[0]) > 1.0
    return True


def check_optimizer(optimizer: torch.optim.Optimizer, spec, preserve_norm: bool, objectives: int = 2) -> str | None:
    """Warn (and return the message) when a rule that can lengthen the gradient (:func:`can_lengthen`)
    meets an optimizer whose step grows with the gradient (SGD): the rule then also raises the
    learning rate. The two- and the K-objective steps' ``check_optimizer`` both call this."""
    # The optimizer inside a wrapper that delegates its step (accelerate's AcceleratedOptimizer, which
    # the Trainer hands over): judged by the wrapper's class name, every optimizer would warn.
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    name = type(inner).__name__
    if preserve_norm or not can_lengthen(spec, objectives) or name in _SCALE_INVARIANT:
        return None
    what = f"rule {spec.name!r}" if isinstance(spec, RuleSpec) else "a user-defined weighting"
    msg = (
        f"{what} can lengthen the gradient and {name} steps in proportion to it: "
        "the rule then also raises the effective learning rate. Use preserve_norm=True, an Adam-type optimizer, "
        "or tune the learning rate per rule."
    )
    warnings.warn(msg, UserWarning, stacklevel=3)
    return msg

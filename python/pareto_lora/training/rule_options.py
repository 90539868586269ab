"""Options around the closed-form rule that the paper does not have (issue 13): statistics
smoothed over steps (an EMA of each group's ||a||^2, ||b||^2, a.b, so that a noise-level cosine in
one step does not flip the conflict branch), a norm-preserving mode (each group's (alpha, beta)
scaled so that ||alpha a + beta b|| = ||a + b||, for optimizers whose step grows with the gradient),
and the check that warns when a norm-increasing rule meets such an optimizer.
May import: nothing from the package but :mod:`pareto_lora.rules`.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

import torch

from ..rules import RuleSpec

__all__ = ["RuleOptions", "preserve_norm_coeffs", "check_optimizer", "NORM_INCREASING"]

#: rules whose output can be longer than g_text + g_image (mmpareto only with gamma > 1)
NORM_INCREASING = ("pareto_lora", "rescale_only", "mmpareto")
# Optimizers whose update is (nearly) invariant to the gradient's scale: a rule that rescales the
# gradient changes their direction mix, not their step size. SGD's step is proportional to it.
_SCALE_INVARIANT = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Adafactor")


def preserve_norm_coeffs(coeffs: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """(alpha, beta) per row scaled so that ||alpha a + beta b|| = ||a + b||, from the statistics
    ([G, 3]: ||a||^2, ||b||^2, a.b) alone; a zero combination (STATIONARY) or a zero sum stays as it is."""
    s, c = stats.to(torch.float64), coeffs.to(torch.float64)
    aa, bb, ab = s[:, 0], s[:, 1], s[:, 2]
    al, be = c[:, 0], c[:, 1]
    now = al * al * aa + be * be * bb + 2.0 * al * be * ab
    want = (aa + bb + 2.0 * ab).clamp_min(0.0)
    factor = torch.where(now > 0, (want / torch.where(now > 0, now, 1.0)).sqrt(), 1.0)
    factor = torch.where(torch.isfinite(factor), factor, 1.0)  # NONFINITE rows keep their plain sum
    return (c * factor[:, None]).to(coeffs.dtype)


class RuleOptions:
    """``stats_ema`` (None or beta in [0, 1): the rule sees beta * previous + (1 - beta) * current
    statistics, finite rows only) and ``preserve_norm`` (bool). Called once per step."""

    def __init__(self, stats_ema: float | None = None, preserve_norm: bool = False):
        if stats_ema is not None and (
            isinstance(stats_ema, bool) or not isinstance(stats_ema, numbers.Real) or not 0.0 <= stats_ema < 1.0
        ):
            raise ValueError(f"stats_ema: expected None or a number in [0, 1), got {stats_ema!r}")
        if not isinstance(preserve_norm, bool):
            raise ValueError(f"preserve_norm: expected a bool, got {preserve_norm!r}")
        self.stats_ema = None if stats_ema is None else float(stats_ema)
        self.preserve_norm = preserve_norm
        self._ema: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.stats_ema) or self.preserve_norm

    def apply(self, group_stats: torch.Tensor, rule_fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        stats = group_stats
        if self.stats_ema:
            beta = self.stats_ema
            finite = torch.isfinite(group_stats).all(dim=1, keepdim=True)
            prev = group_stats if self._ema is None else self._ema.to(group_stats)
            blended = beta * prev + (1.0 - beta) * group_stats
            # A non-finite step (a GradScaler overflow) reaches the rule as it is (NONFINITE) but
            # does not poison the average of later steps.
            stats = torch.where(finite, blended, group_stats)
            self._ema = torch.where(finite, blended, prev).detach()
        coeffs, cases = rule_fn(stats)
        if self.preserve_norm:
            coeffs = preserve_norm_coeffs(coeffs, group_stats)
        return coeffs, cases

    def state_dict(self) -> dict:
        return {"stats_ema": self.stats_ema, "preserve_norm": self.preserve_norm,
                "ema": None if self._ema is None else self._ema.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        ema = state.get("ema")
        self._ema = None if ema is None else ema.clone()


def check_optimizer(optimizer: torch.optim.Optimizer, spec: RuleSpec, preserve_norm: bool) -> str | None:
    """Warn (and return the message) when a rule that can lengthen the gradient meets an optimizer
    whose step grows with the gradient (SGD): the rule then also raises the learning rate."""
    increasing = spec.name in NORM_INCREASING and (spec.name != "mmpareto" or spec.gamma > 1.0)
    if preserve_norm or not increasing or type(optimizer).__name__ in _SCALE_INVARIANT:
        return None
    msg = (
        f"rule {spec.name!r} can lengthen the gradient and {type(optimizer).__name__} steps in proportion to it: "
        "the rule then also raises the effective learning rate. Use preserve_norm=True, an Adam-type optimizer, "
        "or tune the learning rate per rule."
    )
    warnings.warn(msg, UserWarning, stacklevel=3)
    return msg

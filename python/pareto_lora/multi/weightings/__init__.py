"""K-objective weightings: the batched Gram [G, K, K] (float64) -> weights [G, K], one module per rule.

:func:`apply` is the one entry: it takes a :class:`~pareto_lora.RuleSpec` whose name is in
:data:`K_RULES`, or a user-defined weighting (a callable from the batched Gram to the weights,
or a torchjd ``Weighting``; :mod:`.user`), and returns the weights the combine applies with
their case codes. Weightings run batched on the Gram's device (no host round trip per group) and
are deterministic.
"""

from __future__ import annotations

import torch

from ...rules import RuleSpec
from .base import finish, prepare
from .aligned_mtl import aligned_mtl_weighting
from .cagrad import cagrad_weighting
from .config import config_weighting
from .imtl_g import imtl_g_weighting
from .mgda import mgda_weighting
from .nash_mtl import nash_mtl_weighting
from .pcgrad import pcgrad_weighting
from .projection import dualproj_weighting, upgrad_weighting
from .simple import constant_weighting, mean_weighting, sum_weighting
from .user import check_user, is_user_weighting, user_weighting

__all__ = ["K_RULES", "WEIGHTINGS", "apply", "weigh"]

#: rule name -> weighting function (gram [G, K, K] float64 valid, spec) -> (weights [G, K], cases [G]).
WEIGHTINGS = {
    "sum": sum_weighting,
    "mean": mean_weighting,
    "constant": constant_weighting,
    "mgda": mgda_weighting,
    "upgrad": upgrad_weighting,
    "dualproj": dualproj_weighting,
    "pcgrad": pcgrad_weighting,
    "imtl_g": imtl_g_weighting,
    "aligned_mtl": aligned_mtl_weighting,
    "nash_mtl": nash_mtl_weighting,
    "config": config_weighting,
    "cagrad": cagrad_weighting,
}
#: The rules the K-objective op takes by name.
K_RULES: tuple[str, ...] = tuple(WEIGHTINGS)


def check_rule(rule, k: int) -> None:
    """``rule``: a RuleSpec of a K-objective rule (with K weights for ``constant``) or a user weighting
    (:mod:`.user`: a callable, a torchjd Weighting); raises ValueError."""
    if is_user_weighting(rule) and not isinstance(rule, RuleSpec):
        check_user(rule)
        return
    if not isinstance(rule, RuleSpec):
        raise ValueError(f"rule: expected a RuleSpec or a rule name, got {type(rule).__name__}")
    if rule.name not in WEIGHTINGS:
        raise ValueError(f"rule: {rule.name!r} has no K-objective form; expected one of {', '.join(K_RULES)}")
    if rule.name == "constant" and len(rule.weights) != k:
        raise ValueError(f"weights: expected {k} weights (one per objective), got {len(rule.weights)}")


def apply(
    rule,
    gram: torch.Tensor,
    active: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [G, K] in `dtype`, cases [G] int32) of `rule` (a RuleSpec or a user weighting) on the
    batched Gram [G, K, K]."""
    check_rule(rule, gram.shape[-1])
    return weigh(rule, gram, active, dtype)


def weigh(rule, gram: torch.Tensor, active: torch.Tensor | None = None,
          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply` for a rule that :func:`check_rule` has already accepted (integrate_many checks it
    before any pass runs)."""
    valid, invalid = prepare(gram)
    if isinstance(rule, RuleSpec):
        weights, cases = WEIGHTINGS[rule.name](valid, rule)
    else:
        weights, cases = user_weighting(rule, valid)
    return finish(valid, weights.to(torch.float64), cases, invalid, active, dtype)

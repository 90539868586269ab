"""Names and codes shared by every backend: the rule table, the case codes, parameter checks.

The compiled ops receive the rule as a string (it is part of the op schema); the C++ side
parses the same names (csrc/rule.h). ``tests/test_errors.py`` checks the two tables agree.
"""

from __future__ import annotations

import enum
import math

__all__ = ["Case", "RULES", "RULE_DOCS", "check_rule_params"]


class Case(enum.IntEnum):
    """Per-segment outcome code returned in ``cases`` (int32). Public and stable."""

    SUMMED = 0  #: balanced: plain sum a + b
    RESCALED = 1  #: imbalance: the weaker gradient was rescaled to the stronger's norm
    PARETO = 2  #: conflict (cos < 0): MGDA min-norm combination
    INACTIVE = 3  #: segment not selected for modulation: plain sum
    DEGENERATE = 4  #: ||a|| or ||b|| is zero: plain sum (``mgda`` keeps its closed form)
    NONFINITE = 5  #: a statistic is NaN/Inf: plain sum, so the NaN reaches the caller
    STATIONARY = 6  #: ``mmpareto`` with ||h|| = 0: Pareto-stationary, output is zero


# rule name -> one-line description. The order is the rule id used by the kernels.
RULE_DOCS: dict[str, str] = {
    "sum": "a + b (vanilla LoRA)",
    "pareto_lora": "cos < 0 -> MGDA; else r > tau -> rescale weaker to stronger, sum; else sum",
    "pareto_only": "cos < 0 -> MGDA; else sum",
    "rescale_only": "r > tau -> rescale weaker to stronger, sum; else sum",
    "mgda": "always the min-norm convex combination lambda*a + (1-lambda)*b",
    "mmpareto": "h = a + b (cos >= 0) or 2*lambda*a + 2*(1-lambda)*b; out = gamma*||a+b|| h/||h||",
}
RULES: tuple[str, ...] = tuple(RULE_DOCS)


def check_rule_params(rule: str, tau: float, gamma: float) -> None:
    """Raise ValueError for an unknown rule or a non-positive tau/gamma (same checks as C++)."""
    if not isinstance(rule, str) or rule not in RULE_DOCS:
        raise ValueError(f"rule: unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau: expected a finite number > 0, got {tau!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma: expected a finite number > 0, got {gamma!r}")

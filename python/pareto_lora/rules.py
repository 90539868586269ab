"""The rule table, the case codes and :class:`RuleSpec`: the one definition of the rules.

Every backend derives its constants from here: the C++ side parses the same names in the same
order (csrc/rule.h; ``tests/test_errors.py::test_rule_tables_agree`` checks that the tables
agree), and the Triton kernels take their rule ids and case codes from :data:`RULE_IDS` and :class:`Case`.
"""

from __future__ import annotations

import dataclasses
import enum

from . import args

__all__ = [
    "Case",
    "RULES",
    "RULE_DOCS",
    "RULE_IDS",
    "RuleSpec",
    "as_spec",
    "STATS_REL_ERR",
    "CAUCHY_SCHWARZ_SLACK",
    "STATIONARY_REL",
    "MAX_COEFFICIENT",
    "MAX_TERM",
    "term_fits",
]


class Case(enum.IntEnum):
    """Per-segment outcome code returned in ``cases`` (int32). Public and stable."""

    SUMMED = 0  #: balanced: plain sum a + b
    RESCALED = 1  #: imbalance: the weaker gradient was rescaled to the stronger's norm
    PARETO = 2  #: conflict (cos < 0): MGDA min-norm combination
    INACTIVE = 3  #: segment not selected for modulation: plain sum
    DEGENERATE = 4  #: ||a|| or ||b|| is zero: plain sum (``mgda`` keeps its closed form)
    NONFINITE = 5  #: a statistic is NaN/Inf, or a coefficient/term beyond float32 (MAX_TERM): plain sum
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
RULE_IDS: dict[str, int] = {name: i for i, name in enumerate(RULES)}

# The numbers behind the rules' guarantees (csrc/rule.h holds the same; a test compares them).
#: Bound on the relative error of the statistics a rule is given: the kernels add exact products
#: in float64 (error ~ n 2^-53); statistics summed elsewhere in float32 carry 2^-24 per rounding.
STATS_REL_ERR = 2.0**-20
#: a.b may exceed ||a|| ||b|| by this factor from rounding; beyond it the statistics are not valid
#: (case NONFINITE); within it a.b is clamped to +-||a|| ||b||.
CAUCHY_SCHWARZ_SLACK = 4 * STATS_REL_ERR
#: mmpareto: ||h||^2 <= STATIONARY_REL (h_a ||a|| + h_b ||b||)^2 is Pareto-stationary (zero output).
#: Above it the statistics' error moves ||h||^2 by at most 1/16, so ||out|| <= 1.031 gamma ||a + b||.
STATIONARY_REL = 16 * STATS_REL_ERR
#: Coefficients are stored in float32; a larger one is not written: the segment is NONFINITE.
MAX_COEFFICIENT = 3.4028234663852886e38
#: A coefficient c > 1 scales its buffer x up; |c| ||x|| bounds every |c x_i|, which the combine may
#: form in float32. Above this bound the segment is NONFINITE (plain sum), on every backend, rather
#: than an inf in one backend and a finite value in the float64 reference. The margin below float32's
#: maximum covers the statistics' error (STATS_REL_ERR) and the coefficient's float32 rounding.
MAX_TERM = MAX_COEFFICIENT * (1.0 - 4.0 * STATS_REL_ERR)


def term_fits(coefficient, norm):
    """Whether `coefficient` (of a buffer with 2-norm `norm`) can be stored and applied in float32:
    ``|c| <= MAX_COEFFICIENT`` and, for ``|c| > 1``, ``|c| * norm <= MAX_TERM``. Works on floats
    and on tensors (csrc/rule.h term_fits and the Triton kernel decide the same way)."""
    m = abs(coefficient)
    return (m <= MAX_COEFFICIENT) & ((m <= 1.0) | (m * norm <= MAX_TERM))


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """One integration rule with its parameters, validated once when it is made.

    ``name``: one of :data:`RULES`; ``tau``: imbalance threshold on ||a||/||b|| (the paper's
    literal ``r > tau``, or ``max(r, 1/r) > 1/tau`` with ``symmetric``); ``gamma``: the
    ``mmpareto`` magnitude factor; ``margin``: the conflict test of ``pareto_lora``,
    ``pareto_only`` and ``mmpareto`` is ``cos < -margin`` (0, the default, is the paper's
    ``cos < 0``; text and image gradients are nearly orthogonal, so at 0 the test fires on noise).
    The compiled and Triton ops receive the fields unpacked.
    """

    name: str = "pareto_lora"
    tau: float = 0.5
    gamma: float = 1.0
    symmetric: bool = False
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in RULE_IDS:
            raise ValueError(f"rule: unknown rule {self.name!r}; expected one of {', '.join(RULES)}")
        object.__setattr__(self, "tau", args.positive("tau", self.tau))
        object.__setattr__(self, "gamma", args.positive("gamma", self.gamma))
        object.__setattr__(self, "symmetric", args.flag("symmetric", self.symmetric))
        object.__setattr__(self, "margin", args.unit_interval("margin", self.margin))

    @property
    def id(self) -> int:
        """The rule's index in :data:`RULES` (what the kernels switch on)."""
        return RULE_IDS[self.name]


def as_spec(rule: str | RuleSpec = "pareto_lora", tau=None, gamma=None, symmetric=None, margin=None) -> RuleSpec:
    """The :class:`RuleSpec` of the public functions' ``rule, tau, gamma, symmetric, margin`` arguments.

    ``rule`` is a rule name (then ``None`` parameters take the defaults 0.5, 1.0, False, 0.0) or a
    ``RuleSpec`` (then the loose parameters must stay ``None``: one object carries the rule).
    """
    if isinstance(rule, RuleSpec):
        for name, value in (("tau", tau), ("gamma", gamma), ("symmetric", symmetric), ("margin", margin)):
            if value is not None:
                raise ValueError(f"{name}: expected None when rule is a RuleSpec (it carries tau, gamma, symmetric, margin)")
        return rule
    return RuleSpec(
        rule,
        0.5 if tau is None else tau,
        1.0 if gamma is None else gamma,
        False if symmetric is None else symmetric,
        0.0 if margin is None else margin,
    )


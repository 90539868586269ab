"""The rule table, the case codes and :class:`RuleSpec`: the one definition of the rules.

Every backend derives its constants from here: the C++ side parses the same names in the same
order (csrc/rule.h; ``tests/test_errors.py::test_rule_tables_agree`` checks that the tables
agree), and the Triton kernels take their rule ids and case codes from :data:`RULE_IDS` and :class:`Case`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect

from . import args

__all__ = [
    "Case",
    "RULES",
    "RULE_DOCS",
    "RULE_IDS",
    "RuleSpec",
    "KERNEL_PARAMS",
    "as_spec",
    "DEFAULT_RULE",
    "LOOSE",
    "rule_keywords",
    "STATS_REL_ERR",
    "CAUCHY_SCHWARZ_SLACK",
    "STATIONARY_REL",
    "CAGRAD_NORM_EPS",
    "MAX_COEFFICIENT",
    "MAX_TERM",
    "MAX_OBJECTIVES",
    "term_fits",
]


class Case(enum.IntEnum):
    """Per-segment outcome code returned in ``cases`` (int32). Public and stable."""

    SUMMED = 0  #: balanced: plain sum a + b
    RESCALED = 1  #: imbalance: the weaker gradient was rescaled to the stronger's norm
    PARETO = 2  #: conflict (cos < 0): MGDA min-norm combination
    INACTIVE = 3  #: segment not selected for modulation: plain sum
    DEGENERATE = 4  #: ||a|| or ||b|| is zero: plain sum (``mgda`` and the family's rules: their own limit, docs/rules.md)
    NONFINITE = 5  #: a statistic is NaN/Inf, or a coefficient/term beyond float32 (MAX_TERM): plain sum
    STATIONARY = 6  #: ``mmpareto``, ``cagrad``, ``nash_mtl`` at a Pareto-stationary pair (within rounding): output is zero
    WEIGHTED = 7  #: the rule's weighting was applied (a rule without a case split, or its no-conflict branch)


# rule name -> one-line description. The order is the rule id used by the kernels.
RULE_DOCS: dict[str, str] = {
    "sum": "a + b (vanilla LoRA)",
    "pareto_lora": "cos < 0 -> MGDA; else r > tau -> rescale weaker to stronger, sum; else sum",
    "pareto_only": "cos < 0 -> MGDA; else sum",
    "rescale_only": "r > tau -> rescale weaker to stronger, sum; else sum",
    "mgda": "always the min-norm convex combination lambda*a + (1-lambda)*b",
    "mmpareto": "h = a + b (cos >= 0) or 2*lambda*a + 2*(1-lambda)*b; out = gamma*||a+b|| h/||h||",
    "mean": "(a + b)/2 (torchjd Mean)",
    "constant": "w_a*a + w_b*b with weights=(w_a, w_b) (torchjd Constant)",
    "upgrad": "mean of a and b each projected onto the dual cone of {a, b} (torchjd UPGrad, reg_eps)",
    "pcgrad": "a.b < 0 -> each of a, b minus its projection on the other, summed; else a + b (torchjd PCGrad)",
    "dualproj": "(a + b)/2 projected onto the dual cone of {a, b} (torchjd DualProj, reg_eps)",
    "imtl_g": "(||b|| a + ||a|| b)/(||a|| + ||b||): equal projections on a/||a||, b/||b|| (torchjd IMTLG)",
    "cagrad": "(a+b)/2 + c*||(a+b)/2|| g/||g||, g = x*a + (1-x)*b the CAGrad point in closed form (torchjd CAGrad)",
    "nash_mtl": "(a/||a|| + b/||b||)/sqrt(1 + cos), the Nash point G w = 1/w, clipped to max_norm (torchjd NashMTL)",
    "aligned_mtl": "sqrt(lambda_min) G^(-1/2) (1/2, 1/2); rank 1: the mean along the top direction (torchjd AlignedMTL)",
    "config": "(||a|| + ||b||)/2 * (a/||a|| + b/||b||) (torchjd ConFIG)",
}
RULES: tuple[str, ...] = tuple(RULE_DOCS)
RULE_IDS: dict[str, int] = {name: i for i, name in enumerate(RULES)}

#: The most objectives one K-objective op call takes (pareto_lora.multi): the kernels keep
#: K(K+1)/2 = 36 float64 partial sums per thread, and every K-objective solver is exact (or
#: fixed-iteration) up to this size.
MAX_OBJECTIVES = 8

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
#: cagrad: torchjd's norm_eps. ||g|| < CAGRAD_NORM_EPS sqrt(||a||^2 + ||b||^2) (g the CAGrad point of
#: the convex hull) is Pareto-stationary (zero output), as torchjd; relative, so scale-invariant.
CAGRAD_NORM_EPS = 1e-4
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
    c: float = 0.4
    weights: tuple[float, ...] = (1.0, 1.0)
    max_norm: float = 1.0
    reg_eps: float = 1e-4

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in RULE_IDS:
            raise ValueError(f"rule: unknown rule {self.name!r}; expected one of {', '.join(RULES)}")
        object.__setattr__(self, "tau", args.positive("tau", self.tau))
        object.__setattr__(self, "gamma", args.positive("gamma", self.gamma))
        object.__setattr__(self, "symmetric", args.flag("symmetric", self.symmetric))
        object.__setattr__(self, "margin", args.unit_interval("margin", self.margin))
        object.__setattr__(self, "c", args.number("c", self.c, 0.0))
        object.__setattr__(self, "weights", _weights(self.weights))
        object.__setattr__(self, "max_norm", args.number("max_norm", self.max_norm, 0.0))
        object.__setattr__(self, "reg_eps", args.number("reg_eps", self.reg_eps, 0.0))

    @property
    def id(self) -> int:
        """The rule's index in :data:`RULES` (what the kernels switch on)."""
        return RULE_IDS[self.name]

    def kernel_params(self) -> tuple[float, ...]:
        """The parameters as the kernels take them: one float per name in :data:`KERNEL_PARAMS`
        (``symmetric`` as 0.0 / 1.0, ``weights`` as ``w_a``, ``w_b``: the two-objective kernels)."""
        if len(self.weights) != 2:
            raise ValueError(f"weights: expected a pair (w_a, w_b) for the two-objective op, got {len(self.weights)} "
                             "weights (pareto_lora.integrate_many takes one per objective)")
        return (self.tau, self.gamma, float(self.symmetric), self.margin, self.c, *self.weights, self.max_norm,
                self.reg_eps)


def _weights(value) -> tuple[float, ...]:
    """``weights``: 2 to MAX_OBJECTIVES finite numbers >= 0, not all 0 (the constant rule's weights,
    one per objective: (w_a, w_b) for the two-objective op)."""
    if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")
            or not 2 <= len(value) <= MAX_OBJECTIVES):
        raise ValueError(f"weights: expected 2 to {MAX_OBJECTIVES} finite numbers >= 0 (one per objective), "
                         f"got {args.shown(value)}")
    weights = tuple(args.number("weights", w, 0.0) for w in value)
    if not any(weights):
        raise ValueError(f"weights: expected finite numbers >= 0, not all 0, got {weights}")
    return weights


#: The rule parameters in the order the kernels receive them (csrc/rule.h kParamNames, the Triton
#: kernels' arguments): RuleSpec's fields after ``name``, with ``weights`` as its two entries.
KERNEL_PARAMS: tuple[str, ...] = ("tau", "gamma", "symmetric", "margin", "c", "w_a", "w_b", "max_norm", "reg_eps")


#: The rule applied when none is given: every backend's default and the public functions'.
DEFAULT_RULE = RuleSpec()

#: The loose keywords of the public functions: RuleSpec's fields after ``name``, in their order.
LOOSE: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RuleSpec) if f.name != "name")
_LOOSE_SET = frozenset(LOOSE)


def as_spec(rule: str | RuleSpec = "pareto_lora", *values, **loose) -> RuleSpec:
    """The :class:`RuleSpec` of a rule name with loose parameters (:data:`LOOSE`, by position or name).

    ``rule`` is a rule name (then ``None`` parameters take RuleSpec's defaults: tau 0.5, gamma 1.0,
    symmetric False, margin 0.0) or a ``RuleSpec`` (then the loose parameters must stay ``None``:
    one object carries the rule).
    """
    if values:
        if len(values) > len(LOOSE) or any(name in loose for name in LOOSE[: len(values)]):
            raise TypeError(f"as_spec: expected a rule and at most the parameters {', '.join(LOOSE)}, once each")
        loose.update(zip(LOOSE, values))
    if not _LOOSE_SET.issuperset(loose):
        raise TypeError(f"as_spec: unexpected parameter(s) {', '.join(sorted(set(loose) - _LOOSE_SET))}")
    given = {k: v for k, v in loose.items() if v is not None}
    if isinstance(rule, RuleSpec):
        for name in LOOSE:
            if name in given:
                raise ValueError(f"{name}: expected None when rule is a RuleSpec (it carries {', '.join(LOOSE)})")
        return rule
    return RuleSpec(rule, **given)


# Where each loose keyword sits in a public signature, as it has since before RuleSpec, so that
# positional calls (``rule_coefficients(stats, "mgda", 0.4, active, 1.5)``) keep working: right
# after the named parameter, with its kind, when the function has it. A field with no entry (one
# added later) is keyword-only, at the end: adding a rule parameter touches the dataclass alone.
_FOLLOWS = {"tau": "rule", "gamma": "active", "symmetric": "gamma", "margin": "backend"}


def rule_keywords(fn=None, *, collect: str | None = None):
    """Decorator of a public function: ``fn`` is written with a ``rule`` parameter that receives one
    :class:`RuleSpec`; the decorated function takes ``rule`` as a name or a RuleSpec plus one loose
    keyword per RuleSpec field (:data:`LOOSE`, default ``None``), builds the spec once
    (:func:`as_spec`) and calls ``fn``. Its signature is a real one (``inspect.signature``, ``help``).

    ``@rule_keywords(collect="rule_params")``: where ``rule`` may be more than a kernel rule
    (ParetoLoRA: a balancer), ``fn`` is written with a keyword-only parameter of that name instead
    of the loose keywords; it receives them as a dict (field -> value or None), ``rule`` is passed
    as given, and ``fn`` makes the spec. The loose keywords then stand where that parameter stood.

    The wrapper is generated as source, as :mod:`dataclasses` does for ``__init__``: Python binds the
    arguments itself (the same TypeErrors as a hand-written ``def``, no per-call ``inspect`` cost,
    and ``torch.compile`` traces an ordinary function).
    """
    if fn is None:
        return functools.partial(rule_keywords, collect=collect)
    inner = inspect.signature(fn)
    if "rule" not in inner.parameters:
        raise TypeError(f"rule_keywords: {fn.__qualname__} has no 'rule' parameter")
    if collect is not None and getattr(inner.parameters.get(collect), "kind", None) != inspect.Parameter.KEYWORD_ONLY:
        raise TypeError(f"rule_keywords: {fn.__qualname__} has no keyword-only parameter {collect!r}")
    params = [p.replace(default="pareto_lora", annotation="str | RuleSpec") if p.name == "rule" and collect is None
              else p for p in inner.parameters.values()]
    names = [p.name for p in params]
    if set(LOOSE) & set(names):
        raise TypeError(f"rule_keywords: {fn.__qualname__} already takes a loose rule keyword")
    # Where a keyword without its anchor goes: the collecting parameter's place, else the end.
    if collect is not None:
        spot = names.index(collect)
        del params[spot], names[spot]
    else:
        spot = len(params) - (1 if params and params[-1].kind == inspect.Parameter.VAR_KEYWORD else 0)
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(RuleSpec)}
    for name in LOOSE:
        anchor = _FOLLOWS.get(name)
        # With collect, only a positional anchor counts (positional calls); the rest stay together.
        if anchor in names and (collect is None or params[names.index(anchor)].kind != inspect.Parameter.KEYWORD_ONLY):
            at, kind = names.index(anchor) + 1, params[names.index(anchor)].kind
        else:
            at, kind = spot, inspect.Parameter.KEYWORD_ONLY
        params.insert(at, inspect.Parameter(name, kind, default=None, annotation=f"{types[name]} | None"))
        names.insert(at, name)
        if at <= spot:
            spot += 1
    public = inner.replace(parameters=params)
    return _generate(fn, public, collect)


def _generate(fn, public: inspect.Signature, collect: str | None = None):
    # def <name>(<public parameters, defaults by reference>): return _fn(<inner arguments>)
    env, head, call, star = {"_fn": fn, "_as_spec": as_spec}, [], [], False
    for p in public.parameters.values():
        default = ""
        if p.default is not p.empty:
            env[f"_d_{p.name}"] = p.default
            default = f"=_d_{p.name}"
        if p.kind == p.KEYWORD_ONLY and not star:
            head.append("*")
            star = True
        if p.kind == p.POSITIONAL_ONLY:
            raise TypeError(f"rule_keywords: {fn.__qualname__}: positional-only parameters are not supported")
        if p.kind == p.VAR_POSITIONAL:
            head.append(f"*{p.name}")
            call.append(f"*{p.name}")
            star = True
        elif p.kind == p.VAR_KEYWORD:
            head.append(f"**{p.name}")
            call.append(f"**{p.name}")
        else:
            head.append(p.name + default)
            if p.name not in LOOSE:
                spec = p.name == "rule" and collect is None
                value = "_as_spec(rule, " + ", ".join(f"{n}={n}" for n in LOOSE) + ")" if spec else p.name
                call.append(f"{p.name}={value}")
    if collect is not None:
        call.append(f"{collect}={{" + ", ".join(f"{n!r}: {n}" for n in LOOSE) + "}")
    src = f"def {fn.__name__}({', '.join(head)}):\n    return _fn({', '.join(call)})\n"
    exec(src, env)  # noqa: S102  (generated from the signature above, as dataclasses does)
    wrapper = functools.update_wrapper(env[fn.__name__], fn)
    if hasattr(wrapper.__code__, "co_qualname"):  # Python >= 3.11: TypeErrors name "Class.method()"
        wrapper.__code__ = wrapper.__code__.replace(co_qualname=fn.__qualname__)
    del wrapper.__wrapped__  # help() and inspect show the public signature, not fn's
    wrapper.__signature__ = public
    return wrapper

"""The loss-weighting balancers of the field, beside the kernel rules: MIMO and GradNorm.

    pl = pareto_lora.ParetoLoRA(model, balancer="mimo")                        # defaults
    pl = pareto_lora.ParetoLoRA(model, balancer=MIMO(lam=20, mu=0.05))         # with parameters
    pl = pareto_lora.ParetoLoRA(model, balancer=GradNorm(alpha=1.5), modulate="all")
    pl = pareto_lora.ParetoLoRA(model, rule="mimo")                            # the same, shorthand

CoMMIT, a learning-rate scheduler, lives in :mod:`pareto_lora.training.schedulers`; it is
re-exported here for one release (``from pareto_lora.training.balancers import CoMMIT``).

MIMO and GradNorm are not closed-form in one group's three statistics (they need the losses and
state across steps), so they are objects here, not entries of the kernel rule table
(:mod:`pareto_lora.rules`); ParetoLoRA runs them through :class:`.base.BalancedSync`.
"""

from __future__ import annotations

from ...rules import LOOSE, RULES, RuleSpec, as_spec
from .base import Balancer, BalancedSync, weighted_coefficients
from .gradnorm import GradNorm, gradnorm_update
from .mimo import MIMO, mimo_weights, stable_softmax
from ..schedulers import CoMMIT, kl_drift  # moved; re-exported for one release

__all__ = [
    "BALANCERS",
    "METHODS",
    "Balancer",
    "BalancedSync",
    "CoMMIT",
    "GradNorm",
    "MIMO",
    "gradnorm_update",
    "kl_drift",
    "make",
    "mimo_weights",
    "resolve_rule",
    "stable_softmax",
    "weighted_coefficients",
]

#: balancer name -> class (``ParetoLoRA(model, rule=<name>)`` builds one with default parameters)
BALANCERS: dict[str, type[Balancer]] = {"mimo": MIMO, "gradnorm": GradNorm}
#: every method name: the kernel rules, the balancers, and "commit" (a learning-rate scheduler)
METHODS: tuple[str, ...] = (*RULES, *BALANCERS, "commit")


def make(name: str, **params) -> Balancer:
    """The balancer called `name` with `params` (e.g. ``make("mimo", lam=20)``)."""
    if name not in BALANCERS:
        raise ValueError(f"rule: unknown balancer {name!r}; expected one of {', '.join(BALANCERS)}")
    return BALANCERS[name](**params)


def resolve_rule(rule=None, balancer=None, **rule_params) -> tuple[Balancer | None, RuleSpec]:
    """ParetoLoRA's ``rule`` and ``balancer`` arguments -> (balancer or None, the kernel RuleSpec), once.

    ``balancer``: None, a name of :data:`BALANCERS` or a :class:`Balancer`. ``rule="mimo"`` or
    ``rule=MIMO(...)`` is shorthand for ``balancer=`` with the ``sum`` kernel rule. ``rule_params``:
    the loose rule keywords (:data:`pareto_lora.rules.LOOSE`, RuleSpec's fields; None is unset).
    A balancer's weights replace the kernel rule (its cases: SUMMED / INACTIVE / NONFINITE), so the
    kernel rule must then be ``sum`` (None picks it) and every rule keyword must stay unset: a kernel
    rule applied to the balancer's weighted gradients would be a third method that nobody has studied.
    """
    unknown = sorted(set(rule_params) - set(LOOSE))
    if unknown:
        raise TypeError(f"resolve_rule() got an unexpected keyword argument {unknown[0]!r}")
    if isinstance(rule, Balancer) or (isinstance(rule, str) and rule in BALANCERS):
        if balancer is not None:
            raise ValueError(f"balancer: expected None when rule is a balancer ({_name(rule)!r}), got {balancer!r}")
        rule, balancer = None, rule
    if balancer is None:
        return None, as_spec("pareto_lora" if rule is None else rule, **rule_params)
    if isinstance(balancer, str) and balancer in BALANCERS:
        balancer = make(balancer)
    elif not isinstance(balancer, Balancer):
        raise ValueError(f"balancer: expected None, one of {', '.join(BALANCERS)} or a Balancer object "
                         f"(e.g. MIMO(lam=20)), got {balancer!r}")
    for name in LOOSE:
        if rule_params.get(name) is not None:
            raise ValueError(f"{name}: expected None with the {balancer.name!r} balancer (a kernel-rule parameter)")
    spec = as_spec("sum" if rule is None else rule)
    if spec.name != "sum":
        raise ValueError(f"rule: expected 'sum' (or None) with the {balancer.name!r} balancer, whose weights replace "
                         f"the kernel rule; got {spec.name!r}")
    return balancer, spec


def _name(rule) -> str:
    return rule if isinstance(rule, str) else rule.name

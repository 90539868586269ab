"""The other balancing methods of the field, beside the kernel rules: MIMO, GradNorm (loss weights
for ParetoLoRA) and CoMMIT (coordinated learning rates for an optimizer).

    pl = pareto_lora.ParetoLoRA(model, rule="mimo")                        # defaults
    pl = pareto_lora.ParetoLoRA(model, rule=MIMO(lam=20, mu=0.05))         # with parameters
    pl = pareto_lora.ParetoLoRA(model, rule=GradNorm(alpha=1.5), modulate="all")
    sched = CoMMIT(optimizer, llm_group=0, feature_group=1)                # replaces optimizer.step()

MIMO and GradNorm are not closed-form in one group's three statistics (they need the losses and
state across steps), so they are objects here, not entries of the kernel rule table
(:mod:`pareto_lora.rules`); ParetoLoRA runs them through :class:`.base.BalancedSync`.
May import: :mod:`pareto_lora.flat`, :mod:`pareto_lora.ops`, :mod:`pareto_lora.rules`, and its own modules.
"""

from __future__ import annotations

from ...rules import RULES, RuleSpec, as_spec
from .base import Balancer, BalancedSync, weighted_coefficients
from .commit import CoMMIT, kl_drift
from .gradnorm import GradNorm, gradnorm_update
from .mimo import MIMO, mimo_weights, stable_softmax

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


def resolve_rule(rule, tau=None, gamma=None, symmetric=None) -> tuple[Balancer | None, RuleSpec]:
    """ParetoLoRA's ``rule`` argument -> (balancer or None, the kernel RuleSpec).

    A balancer (object or name) runs with the kernel ``sum`` rule underneath (its cases:
    SUMMED / INACTIVE / NONFINITE); tau, gamma and symmetric belong to the kernel rules and
    must then stay unset.
    """
    if isinstance(rule, str) and rule in BALANCERS:
        rule = make(rule)
    if isinstance(rule, Balancer):
        for name, value in (("tau", tau), ("gamma", gamma), ("symmetric", symmetric)):
            if value is not None:
                raise ValueError(f"{name}: expected None with the {rule.name!r} balancer (a kernel-rule parameter)")
        return rule, RuleSpec("sum")
    return None, as_spec(rule, tau, gamma, symmetric)

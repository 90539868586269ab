"""RuleSpec: the one object that carries a rule, validated once; the loose arguments map onto it."""

import dataclasses
import inspect

import pytest
import torch

import pareto_lora
from pareto_lora import RULES, RuleSpec
from pareto_lora.rules import LOOSE, RULE_IDS, as_spec


def test_defaults_and_ids_follow_the_rule_table():
    assert RuleSpec() == RuleSpec("pareto_lora", 0.5, 1.0, False)
    assert [RuleSpec(name).id for name in RULES] == list(range(len(RULES))) == [RULE_IDS[n] for n in RULES]


def test_spec_is_frozen_and_normalised():
    spec = RuleSpec("mmpareto", tau=1, gamma=2, symmetric=True)
    assert (spec.tau, spec.gamma, spec.symmetric) == (1.0, 2.0, True)
    assert isinstance(spec.tau, float) and isinstance(spec.symmetric, bool)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tau = 0.3


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(name="paretoo"), "rule"),
        (dict(name=None), "rule"),
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(tau=float("inf")), "tau"),
        (dict(tau=10**400), "tau"),
        (dict(tau=True), "tau"),
        (dict(tau="0.5"), "tau"),
        (dict(gamma=0), "gamma"),
        (dict(gamma=float("inf")), "gamma"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        RuleSpec(**kwargs)


def test_as_spec_takes_a_name_with_loose_parameters_or_one_spec():
    assert as_spec("mgda", 0.3, 2.0, True) == RuleSpec("mgda", 0.3, 2.0, True)
    assert as_spec("mgda") == RuleSpec("mgda")
    spec = RuleSpec("mmpareto", gamma=1.5)
    assert as_spec(spec) is spec
    with pytest.raises(ValueError, match=r"^tau: expected None when rule is a RuleSpec"):
        as_spec(spec, tau=0.5)


def test_public_functions_accept_a_spec_and_give_the_same_result():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    offsets = torch.tensor([0, 20, 64])
    loose = pareto_lora.integrate(a, b, offsets, rule="mmpareto", tau=0.3, gamma=1.5, symmetric=True)
    spec = pareto_lora.integrate(a, b, offsets, rule=RuleSpec("mmpareto", 0.3, 1.5, True))
    torch.testing.assert_close(loose.out, spec.out, rtol=0, atol=0)
    assert torch.equal(loose.cases, spec.cases)
    with pytest.raises(ValueError, match=r"^gamma: expected None"):
        pareto_lora.rule_coefficients(loose.stats, RuleSpec("mgda"), gamma=2.0)


def test_the_public_signatures_take_every_rule_field_as_a_loose_keyword():
    # One list (RuleSpec's fields) makes the loose keywords of every public function; their places
    # are the ones positional calls have used since before RuleSpec.
    fields = [f.name for f in dataclasses.fields(RuleSpec) if f.name != "name"]
    assert list(LOOSE) == fields
    order = ["rule", "tau", "active", "gamma", "symmetric"]
    for fn in (pareto_lora.integrate, pareto_lora.rule_coefficients, pareto_lora.distributed.sharded_integrate):
        params = inspect.signature(fn).parameters
        assert set(fields) <= set(params), fn.__name__
        assert all(params[n].default is None for n in fields), fn.__name__
        names = [n for n in params if n in order]
        assert names == order, fn.__name__
        assert list(params).index("margin") == list(params).index("backend") + 1, fn.__name__
        assert "rule: 'str | RuleSpec' = 'pareto_lora'" in str(inspect.signature(fn))
        assert fn.__doc__ and not hasattr(fn, "__wrapped__")


def test_loose_keywords_by_position_and_by_name_are_one_rule():
    gen = torch.Generator().manual_seed(4)
    stats = torch.rand(30, 3, generator=gen, dtype=torch.float64) - 0.25
    stats[:, :2] = stats[:, :2].abs() + 1.0
    active = torch.rand(30, generator=gen) > 0.3
    by_pos = pareto_lora.rule_coefficients(stats, "mmpareto", 0.4, active, 1.5, True, "reference", 0.1)
    by_name = pareto_lora.rule_coefficients(stats, rule="mmpareto", tau=0.4, active=active, gamma=1.5, symmetric=True,
                                            backend="reference", margin=0.1)
    spec = pareto_lora.rule_coefficients(stats, RuleSpec("mmpareto", 0.4, 1.5, True, 0.1), active=active,
                                         backend="reference")
    for got in (by_pos, by_name):
        assert torch.equal(got[0], spec[0]) and torch.equal(got[1], spec[1])
    with pytest.raises(TypeError, match="multiple values for argument 'tau'"):
        pareto_lora.rule_coefficients(stats, "mgda", 0.4, tau=0.4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lam'"):
        pareto_lora.rule_coefficients(stats, "mgda", lam=0.4)


def test_the_oracle_takes_the_spec_like_every_backend():
    stats = torch.tensor([[1.0, 4.0, -1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^spec: expected a pareto_lora.RuleSpec"):
        pareto_lora.reference.rule_coefficients(stats, "mgda")
    with pytest.raises(TypeError):
        pareto_lora.reference.rule_coefficients(stats, RuleSpec("mgda"), 0.5)  # no loose keywords below the boundary


@pytest.mark.parametrize("field, value, message", [
    ("c", -0.1, "c: expected a finite number >= 0"),
    ("c", float("nan"), "c: expected a finite number >= 0"),
    ("c", float("inf"), "c: expected a finite number >= 0"),
    ("c", "0.4", "c: expected a finite number >= 0"),
    ("c", True, "c: expected a finite number >= 0"),
    ("weights", (0.0, 0.0), "weights: expected finite numbers >= 0, not all 0"),
    ("weights", (1.0,), "weights: expected 2 to 8 finite numbers >= 0 (one per objective)"),
    ("weights", (1.0,) * 9, "weights: expected 2 to 8 finite numbers >= 0 (one per objective)"),
    ("weights", "ab", "weights: expected 2 to 8 finite numbers >= 0 (one per objective)"),
    ("weights", None, "weights: expected 2 to 8 finite numbers >= 0 (one per objective)"),
    ("weights", (1.0, float("nan")), "weights: expected a finite number >= 0"),
    ("weights", (1.0, -1.0), "weights: expected a finite number >= 0"),
    ("weights", (True, 1.0), "weights: expected a finite number >= 0"),
    ("max_norm", -1.0, "max_norm: expected a finite number >= 0"),
    ("max_norm", float("nan"), "max_norm: expected a finite number >= 0"),
    ("max_norm", "False", "max_norm: expected a finite number >= 0"),
    ("reg_eps", -1e-4, "reg_eps: expected a finite number >= 0"),
    ("reg_eps", float("inf"), "reg_eps: expected a finite number >= 0"),
    ("reg_eps", False, "reg_eps: expected a finite number >= 0"),
])
def test_family_parameters_are_checked_by_name(field, value, message):
    """RuleSpec refuses what csrc/rule.h's parse_rule_params refuses (tests/test_errors.py), by name."""
    with pytest.raises(ValueError) as err:
        RuleSpec("cagrad", **{field: value})
    assert str(err.value).startswith(message)
    if value is None:  # a loose keyword left None means "RuleSpec's default" (as_spec), by design
        return
    with pytest.raises(ValueError) as err:  # the loose keyword of a public function: the same message
        pareto_lora.rule_coefficients(torch.rand(2, 3, dtype=torch.float64), "cagrad", **{field: value})
    assert str(err.value).startswith(message)

"""ParetoLoRA takes every RuleSpec field as a keyword, derived from the dataclass (issue 23): a new
rule parameter touches RuleSpec alone. The keyword and the RuleSpec are one rule, bitwise; a
balancer refuses every rule keyword by name; an unknown keyword is Python's TypeError."""

import dataclasses
import inspect

import pytest
import torch

import pareto_lora
from pareto_lora import RuleSpec
from pareto_lora.rules import DEFAULT_RULE, LOOSE, rule_keywords
from pareto_lora.training import ParetoLoRA
from pareto_lora.training.balancers import resolve_rule

import models


def _step(pl, model, seeds=(0, 1)):
    for seed in seeds:
        batch = models.token_batch(seed=seed)
        out = model(**models.model_inputs(batch))
        report = pl.backward(*pareto_lora.modality_losses(out.logits, batch["labels"],
                                                          image_token_mask=batch["image_token_mask"]))
    return [p.grad.clone() for p in pl.layout.params], report


def test_margin_by_keyword_is_margin_by_rulespec_bitwise():
    model = models.lora_llama(num_layers=2)
    runs = {}
    for key, kw in {"keyword": dict(rule="pareto_lora", margin=0.3), "spec": dict(rule=RuleSpec(margin=0.3)),
                    "zero": dict(rule="pareto_lora")}.items():
        pl = ParetoLoRA(model, num_groups=2, modulate="all", **kw)
        runs[key] = (pl, *_step(pl, model))
    (pl, grads, report), (_, spec_grads, spec_report) = runs["keyword"], runs["spec"]
    assert pl.spec == RuleSpec("pareto_lora", margin=0.3) and pl.margin == 0.3
    assert all(torch.equal(x, y) for x, y in zip(grads, spec_grads))
    assert report.cases == spec_report.cases
    # The margin reaches the rule: group 1 (cos -0.26) is PARETO at margin 0, RESCALED at 0.3.
    assert report.cases != runs["zero"][2].cases


def test_positional_calls_keep_their_places():
    model = models.lora_llama(num_layers=2)
    pl = ParetoLoRA(model, "mgda", 0.3, 2, "all")
    assert pl.spec == RuleSpec("mgda", tau=0.3) and pl.layout.num_groups == 2 and bool(pl.layout.active.all())
    with pytest.raises(TypeError, match=r"^ParetoLoRA.__init__\(\) got multiple values for argument 'tau'"):
        ParetoLoRA(model, "mgda", 0.3, tau=0.3)


def test_the_signature_shows_every_rule_field():
    params = inspect.signature(ParetoLoRA).parameters
    assert list(params)[:5] == ["model", "rule", "tau", "num_groups", "modulate"]
    assert all(params[n].default is None for n in LOOSE) and "rule_params" not in params
    assert [n for n in params if n in LOOSE][1:] == [n for n in LOOSE if n != "tau"]
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in LOOSE if n != "tau")
    assert "margin: 'float | None' = None" in str(inspect.signature(ParetoLoRA))
    assert not hasattr(ParetoLoRA.__init__, "__wrapped__")
    model = models.lora_llama(num_layers=2)
    spec = RuleSpec("mmpareto", 0.3, 1.5, True, 0.2)
    pl = ParetoLoRA(model, rule=spec, num_groups=2)
    assert [getattr(pl, n) for n in LOOSE] == [getattr(spec, n) for n in LOOSE]


@pytest.mark.parametrize("name", LOOSE)
@pytest.mark.parametrize("how", ["rule", "balancer"])
def test_a_balancer_refuses_every_rule_keyword_by_name(name, how):
    model = models.lora_llama(num_layers=2)
    value = getattr(DEFAULT_RULE, name)  # even the default value: set is set
    with pytest.raises(ValueError, match=rf"^{name}: expected None with the 'mimo' balancer"):
        ParetoLoRA(model, num_groups=2, **{how: "mimo", name: value})


def test_an_unknown_keyword_is_a_type_error():
    model = models.lora_llama(num_layers=2)
    with pytest.raises(TypeError, match=r"^ParetoLoRA.__init__\(\) got an unexpected keyword argument 'lam'"):
        ParetoLoRA(model, lam=20)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lam'"):
        resolve_rule("mimo", lam=20)
    assert resolve_rule("mgda", margin=0.25) == (None, RuleSpec("mgda", margin=0.25))


def test_rule_keywords_collect_needs_a_keyword_only_parameter():
    def f(rule, rule_params):
        return rule, rule_params

    with pytest.raises(TypeError, match="no keyword-only parameter 'rule_params'"):
        rule_keywords(collect="rule_params")(f)

    @rule_keywords(collect="rule_params")
    def g(rule=None, *, rule_params):
        return rule, rule_params

    assert g("x", margin=0.5) == ("x", {**dict.fromkeys(LOOSE), "margin": 0.5})
    assert [f.name for f in dataclasses.fields(RuleSpec)][1:] == list(LOOSE)

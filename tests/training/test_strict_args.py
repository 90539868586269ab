"""Issue 27, flags and numbers: one validator (pareto_lora.args) behind RuleSpec, RuleOptions, MIMO,
GradNorm, CoMMIT and ParetoLoRA. A flag is exactly a bool, a number a real that is not a bool; anything
else is ValueError("<argument>: expected ...") before anything changes."""

import numpy as np
import pytest
import torch

import pareto_lora
from pareto_lora import RuleSpec, args
from pareto_lora.training.balancers import MIMO, CoMMIT, GradNorm
from pareto_lora.training.rule_options import RuleOptions

import models


def _opt():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [p]}, {"params": [q]}], lr=0.1)


CASES = [
    # silently wrong before: a string or list flag was truthy, a bool was a number
    (lambda: RuleSpec(symmetric="False"), "symmetric"),
    (lambda: RuleSpec(symmetric="false"), "symmetric"),
    (lambda: RuleSpec(symmetric=[False]), "symmetric"),
    (lambda: RuleSpec(symmetric=0), "symmetric"),
    (lambda: RuleSpec(symmetric=None), "symmetric"),
    (lambda: RuleSpec(margin=True), "margin"),
    (lambda: MIMO(per_group="False"), "per_group"),
    (lambda: MIMO(lam=False), "lam"),
    (lambda: GradNorm(alpha=True), "alpha"),
    (lambda: MIMO(floor=(True, False)), "floor"),
    (lambda: RuleOptions(preserve_norm="True"), "preserve_norm"),
    (lambda: RuleOptions(stats_ema=True), "stats_ema"),
    (lambda: CoMMIT(regularize="no"), "regularize"),
    # the wrong kind of error before (OverflowError, TypeError)
    (lambda: RuleSpec(margin=10**400), "margin"),
    (lambda: RuleSpec(tau=-(10**400)), "tau"),
    (lambda: MIMO(floor=5), "floor"),
    (lambda: MIMO(floor=None), "floor"),
    (lambda: MIMO(floor=(1.0, "x")), "floor"),
    (lambda: MIMO(ema="0.9"), "ema"),
    (lambda: MIMO(mu=None), "mu"),
    (lambda: GradNorm(alpha="1.5"), "alpha"),
    (lambda: GradNorm(lr=None), "lr"),
    (lambda: GradNorm(min_weight="x"), "min_weight"),
    (lambda: GradNorm(group=1.0), "group"),
    (lambda: GradNorm(group=True), "group"),
    (lambda: CoMMIT(base_lr="1e-3"), "base_lr"),
    (lambda: CoMMIT(kappa_max=None), "kappa_max"),
    (lambda: CoMMIT(reg_weight="0.1"), "reg_weight"),
    (lambda: CoMMIT(llm_group="0"), "llm_group"),
    (lambda: CoMMIT(_opt(), llm_group=True, feature_group=0), "llm_group"),
]


@pytest.mark.parametrize("make, arg", CASES, ids=[f"{i}-{a}" for i, (_, a) in enumerate(CASES)])
def test_bad_flags_and_numbers_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: expected "):
        make()


def test_the_message_is_one_short_line():
    with pytest.raises(ValueError) as err:
        RuleSpec(margin=10**400)
    assert len(str(err.value)) < 120 and "\n" not in str(err.value)


def test_numpy_scalars_and_plain_values_are_accepted():
    spec = RuleSpec(tau=np.float32(0.25), gamma=np.int64(2), symmetric=True, margin=np.float64(0.1))
    assert (spec.tau, spec.gamma, spec.symmetric, spec.margin) == (0.25, 2.0, True, 0.1)
    assert type(spec.tau) is float and type(spec.gamma) is float
    m = MIMO(lam=np.float64(5), floor=[np.float32(1.0), 2], per_group=True)
    assert (m.lam, m.fixed, m.per_group) == (5.0, (1.0, 2.0), True)
    assert GradNorm(group=np.int64(1)).group == 1
    assert RuleOptions(stats_ema=np.float32(0.5)).stats_ema == 0.5
    assert args.integer("every", np.int32(3), 1) == 3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-300])
def test_number_refuses_nan_inf_and_out_of_range(value):
    with pytest.raises(ValueError, match="^x: expected a finite number > 0"):
        args.positive("x", value)


def test_paretolora_arguments_go_through_the_same_checks():
    model = models.lora_llama(num_layers=2)
    for kw, arg in ((dict(symmetric="False"), "symmetric"), (dict(preserve_norm=1), "preserve_norm"),
                    (dict(stats_ema="0.5"), "stats_ema"), (dict(on_nonfinite=None), "on_nonfinite"),
                    (dict(tau=[0.5]), "tau")):
        with pytest.raises(ValueError, match=rf"^{arg}: expected "):
            pareto_lora.ParetoLoRA(model, num_groups=2, **kw)


def test_gradnorm_group_out_of_range_is_refused_at_construction_before_any_state_changes():
    model = models.lora_llama(num_layers=3)
    gn = GradNorm(group=7)
    before = {k: v.clone() for k, v in gn.state_dict().items()}
    with pytest.raises(ValueError, match=r"^group: expected a group index < 3"):
        pareto_lora.ParetoLoRA(model, balancer=gn, num_groups=3)
    for k, v in gn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    assert all(p.grad is None for p in model.parameters())
    assert not hasattr(gn, "window_losses")  # never bound


def test_backward_step_flag_is_strict_and_changes_nothing():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, num_groups=2)
    batch = models.token_batch()
    out = model(**models.model_inputs(batch))
    lt, li = pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])
    with pytest.raises(ValueError, match="^step: expected True or False, got 'False'"):
        pl.backward(text=lt, image=li, step="False")
    assert pl.micro_batches == 0 and all(p.grad is None for p in model.parameters())

"""Issue 13's options beyond the paper: statistics smoothed over steps, the norm-preserving mode,
and the warning for a norm-increasing rule under SGD."""

import warnings

import pytest
import torch

import pareto_lora
from pareto_lora import RuleSpec, reference
from pareto_lora.training import ParetoLoRA
from pareto_lora.training.rule_options import RuleOptions, check_optimizer, preserve_norm_coeffs

import models


def losses_of(model, batch):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


@pytest.fixture
def llama():
    return models.lora_llama(num_layers=3)


def test_preserve_norm_coeffs_oracle():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 50, generator=gen, dtype=torch.float64), torch.randn(4, 50, generator=gen, dtype=torch.float64)
    stats = torch.stack([(a * a).sum(1), (b * b).sum(1), (a * b).sum(1)], 1)
    coeffs = torch.tensor([[1.0, 3.0], [0.2, 0.8], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    out = preserve_norm_coeffs(coeffs, stats)
    for i in (0, 1, 3):
        torch.testing.assert_close((out[i, 0] * a[i] + out[i, 1] * b[i]).norm(), (a[i] + b[i]).norm())
    assert out[2].tolist() == [0.0, 0.0]  # a STATIONARY zero stays zero
    assert out[3].tolist() == [1.0, 1.0]  # the plain sum is untouched
    nan = preserve_norm_coeffs(torch.ones(1, 2), torch.tensor([[float("nan"), 1.0, 0.0]]))
    assert nan.tolist() == [[1.0, 1.0]]


def test_preserve_norm_in_training_keeps_each_groups_norm(llama):
    batch = models.token_batch(seed=3)
    plain = ParetoLoRA(llama, rule="sum", num_groups=3, modulate="all")
    plain.backward(*losses_of(llama, batch))
    want = [p.grad.clone() for p in plain.layout.params]
    pl = ParetoLoRA(llama, rule="rescale_only", num_groups=3, modulate="all", preserve_norm=True)
    report = pl.backward(*losses_of(llama, batch))
    assert any(c == pareto_lora.Case.RESCALED for c in report.cases)
    ug = pl.layout.unit_group.tolist()
    for g in range(pl.layout.num_groups):
        idx = [i for i, u in enumerate(pl.layout.param_unit) if ug[u] == g]
        got = torch.sqrt(sum((pl.layout.params[i].grad.double() ** 2).sum() for i in idx))
        ref = torch.sqrt(sum((want[i].double() ** 2).sum() for i in idx))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_stats_ema_rule_sees_the_running_average(llama):
    beta = 0.8
    pl = ParetoLoRA(llama, rule="pareto_lora", num_groups=3, modulate="all", stats_ema=beta)
    ema = None
    for seed in range(3):
        report = pl.backward(*losses_of(llama, models.token_batch(seed=seed)))
        stats = report.step.group_stats.double()
        ema = stats if ema is None else beta * ema + (1 - beta) * stats
        _, want_cases = reference.rule_coefficients(ema, "pareto_lora", active=pl.layout.active)
        assert report.cases == want_cases.tolist()
    state = pl.state_dict()
    assert torch.allclose(state["options"]["ema"], ema)


def test_stats_ema_zero_is_the_plain_rule_bitwise(llama):
    batch = models.token_batch(seed=4)
    a = ParetoLoRA(llama, rule="mmpareto", num_groups=3, modulate="all")
    a.backward(*losses_of(llama, batch))
    ga = [p.grad.clone() for p in a.layout.params]
    b = ParetoLoRA(llama, rule="mmpareto", num_groups=3, modulate="all", stats_ema=0.0)
    b.backward(*losses_of(llama, batch))
    assert all(torch.equal(x, p.grad) for x, p in zip(ga, b.layout.params))


def test_a_nonfinite_step_does_not_poison_the_average():
    opts = RuleOptions(stats_ema=0.5)
    seen = []
    rule = lambda s: (seen.append(s.clone()) or torch.ones(s.shape[0], 2), torch.zeros(s.shape[0], dtype=torch.int32))  # noqa: E731
    opts.apply(torch.tensor([[4.0, 1.0, 0.0]], dtype=torch.float64), rule)
    opts.apply(torch.tensor([[float("inf"), 1.0, 0.0]], dtype=torch.float64), rule)
    opts.apply(torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64), rule)
    assert seen[1][0, 0].item() == float("inf")  # the bad step itself is flagged
    assert seen[2][0].tolist() == [3.0, 1.0, 0.0]  # and the average skipped it


@pytest.mark.parametrize("kw, arg", [(dict(stats_ema=1.0), "stats_ema"), (dict(stats_ema=-0.1), "stats_ema"),
                                     (dict(stats_ema="0.9"), "stats_ema"), (dict(preserve_norm=1), "preserve_norm")])
def test_bad_options_name_the_argument(llama, kw, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        ParetoLoRA(llama, **kw)


def test_options_are_refused_with_a_balancer(llama):
    with pytest.raises(ValueError, match="stats_ema, preserve_norm: expected a kernel rule"):
        ParetoLoRA(llama, rule="mimo", preserve_norm=True)


def test_sgd_with_a_norm_increasing_rule_warns():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.warns(UserWarning, match="raises the effective learning rate"):
        assert check_optimizer(torch.optim.SGD(params, lr=0.1), RuleSpec("pareto_lora"), preserve_norm=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_optimizer(torch.optim.AdamW(params), RuleSpec("pareto_lora"), False) is None
        assert check_optimizer(torch.optim.SGD(params, lr=0.1), RuleSpec("pareto_lora"), True) is None
        assert check_optimizer(torch.optim.SGD(params, lr=0.1), RuleSpec("mgda"), False) is None
        assert check_optimizer(torch.optim.SGD(params, lr=0.1), RuleSpec("mmpareto", gamma=1.0), False) is None

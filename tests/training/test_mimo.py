"""MIMO: the weights against hand-computed values (float64), their properties, the one-backward step
against plain autograd, the per-group step against the reference sum, floors, state and the report."""

import math

import pytest
import torch

import pareto_lora
from pareto_lora import Case
from pareto_lora.training.balancers import MIMO, mimo_weights, stable_softmax

import models


def f64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_weights_by_hand():
    # gaps (0.5, 1.0), mu 0.5 -> z = (1, 2): sigma_text = e/(e + e^2) = 1/(1 + e)
    coeffs, sigma, gaps = mimo_weights(f64(2.0, 3.0), f64(1.5, 2.0), lam=10.0, mu=0.5)
    s_text = 1.0 / (1.0 + math.e)  # 0.2689414213699951
    assert gaps.tolist() == [0.5, 1.0]
    torch.testing.assert_close(sigma, f64(s_text, 1.0 - s_text), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(coeffs, f64(1.0 + 10.0 * s_text, 1.0 + 10.0 * (1.0 - s_text)), rtol=1e-15, atol=1e-15)
    assert coeffs.dtype == torch.float64


def test_equal_gaps_split_evenly_and_lam_zero_is_vanilla():
    coeffs, sigma, _ = mimo_weights(f64(4.0, 2.5), f64(3.0, 1.5), lam=10.0, mu=0.1)
    assert sigma.tolist() == [0.5, 0.5] and coeffs.tolist() == [6.0, 6.0]
    coeffs, _, _ = mimo_weights(f64(4.0, 2.5), f64(1.0, 2.0), lam=0.0, mu=0.1)
    assert coeffs.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("mu", [1e-300, 1e-12, 1e-3])
def test_softmax_does_not_overflow_for_tiny_mu(mu):
    # gaps / mu would be ~1e300+ (inf in float64): shifting by the max first keeps it finite
    _, sigma, _ = mimo_weights(f64(1e3, 2.0), f64(0.0, 1.0), lam=10.0, mu=mu)
    assert torch.isfinite(sigma).all() and sigma.tolist() == [1.0, 0.0]
    s = stable_softmax(f64(1e308, -1e308), 1e-300)
    assert s.tolist() == [1.0, 0.0]


def test_nonfinite_loss_gives_even_weights():
    coeffs, sigma, _ = mimo_weights(f64(math.nan, 1.0), f64(0.0, 0.0), lam=10.0, mu=0.1)
    assert sigma.tolist() == [0.5, 0.5] and torch.isfinite(coeffs).all()


@pytest.mark.parametrize("seed", range(20))
def test_properties_sum_and_monotone_in_the_gap(seed):
    gen = torch.Generator().manual_seed(seed)
    losses = torch.rand(2, generator=gen, dtype=torch.float64) * 5
    floors = losses - torch.rand(2, generator=gen, dtype=torch.float64) * 2
    mu = float(10 ** torch.empty(1).uniform_(-4, 1, generator=gen))
    lam = float(torch.rand(1, generator=gen) * 50)
    coeffs, sigma, gaps = mimo_weights(losses, floors, lam, mu)
    assert abs(float(sigma.sum()) - 1.0) < 1e-12 and (sigma >= 0).all()
    assert abs(float(coeffs.sum()) - (2.0 + lam)) < 1e-9
    # the larger gap gets the larger weight, and raising one gap never lowers its weight
    assert (sigma[0] >= sigma[1]) == (gaps[0] >= gaps[1])
    bumped = losses + f64(float(torch.rand(1, generator=gen)), 0.0)
    _, sigma2, _ = mimo_weights(bumped, floors, lam, mu)
    assert sigma2[0] >= sigma[0]
    # swapping the objectives swaps the weights
    _, sigma_sw, _ = mimo_weights(losses.flip(0), floors.flip(0), lam, mu)
    torch.testing.assert_close(sigma_sw, sigma.flip(0), rtol=0, atol=1e-15)


def test_floors_min_ema_fixed():
    m = MIMO(floor="min")
    for x in ([3.0, 5.0], [2.0, 6.0], [4.0, 4.0]):
        m.loss_weights(f64(*x))
    assert m.floors.tolist() == [2.0, 4.0]
    assert m.metrics()["mimo/gap_text"].item() == 2.0 and m.metrics()["mimo/gap_image"].item() == 0.0
    e = MIMO(floor="ema", ema=0.5)
    for x in ([4.0, 2.0], [2.0, 4.0]):
        e.loss_weights(f64(*x))
    assert e.floors.tolist() == [3.0, 3.0]
    fx = MIMO(floor=(1.0, 2.0))
    fx.loss_weights(f64(5.0, 5.0))
    assert fx.floors.tolist() == [1.0, 2.0] and fx.metrics()["mimo/gap_text"].item() == 4.0
    # a batch with a non-finite loss moves no floor, not even the finite side's (issue 27: the step
    # is refused or skipped, so nothing of it may enter the state)
    m.loss_weights(f64(math.inf, 1.0))
    assert m.floors.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("kw, field", [({"lam": -1}, "lam"), ({"mu": 0}, "mu"), ({"mu": math.inf}, "mu"),
                                       ({"floor": "max"}, "floor"), ({"floor": (1.0,)}, "floor"), ({"ema": 1.0}, "ema")])
def test_bad_parameters(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        MIMO(**kw)


def test_kernel_rule_parameters_refused_with_a_balancer():
    model = models.lora_llama(num_layers=2)
    with pytest.raises(ValueError, match="^tau:"):
        pareto_lora.ParetoLoRA(model, rule="mimo", tau=0.5, num_groups=2)
    assert "mimo" not in pareto_lora.RULES  # not a kernel rule


def _losses(model, batch):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


def _named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def test_one_backward_equals_autograd_of_the_weighted_loss():
    model = models.lora_llama(num_layers=3)
    pl = pareto_lora.ParetoLoRA(model, rule=MIMO(lam=10, mu=0.1, floor=(1.0, 3.0)), num_groups=3)
    batch = models.token_batch(seed=3)
    lt, li = _losses(model, batch)
    _, sigma, _ = mimo_weights(torch.stack([lt, li]).detach().double(), f64(1.0, 3.0), 10.0, 0.1)
    alpha, beta = 1 + 10 * sigma
    named = _named(model)
    want = torch.autograd.grad(alpha.float() * lt + beta.float() * li, [p for _, p in named], retain_graph=True)
    report = pl.backward(text=lt, image=li)
    for (n, p), g in zip(named, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=n)
    d = report.as_dict()
    assert d["pareto/mimo/sigma_text"] == pytest.approx(float(sigma[0]), rel=1e-12)
    assert d["pareto/mimo/alpha"] == pytest.approx(float(alpha), rel=1e-12)
    assert {"pareto/mimo/gap_image", "pareto/mimo/floor_text", "pareto/mimo/beta"} <= d.keys()
    assert report.rule == "mimo" and set(report.cases) == {int(Case.SUMMED)}
    assert math.isnan(report.groups["group0"]["norm_text"])  # one backward: no per-group statistics
    rec = report.to_record()
    assert rec["balancer"]["mimo/sigma_image"] == pytest.approx(float(sigma[1]), rel=1e-12)


def test_one_backward_accumulation_sums_the_weighted_micro_batches():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, rule=MIMO(floor=(0.0, 0.0), mu=1.0), num_groups=2)
    named = _named(model)
    want = [torch.zeros_like(p) for _, p in named]
    for seed in (0, 1):
        batch = models.token_batch(seed=seed)
        lt, li = _losses(model, batch)
        _, sigma, _ = mimo_weights(torch.stack([lt, li]).detach().double(), f64(0.0, 0.0), 10.0, 1.0)
        gs = torch.autograd.grad((1 + 10 * sigma[0]).float() * lt + (1 + 10 * sigma[1]).float() * li,
                                 [p for _, p in named], retain_graph=True)
        want = [w + g for w, g in zip(want, gs)]
        pl.accumulate(text=lt, image=li)
    report = pl.integrate_accumulated()
    for (n, p), g in zip(named, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=n)
    assert report.micro_batches == 2


def test_per_group_weights_the_modulated_groups_only():
    model = models.lora_llama(num_layers=4)
    mimo = MIMO(lam=10, mu=0.5, floor=(2.0, 2.0), per_group=True)
    pl = pareto_lora.ParetoLoRA(model, rule=mimo, num_groups=2, modulate="lower")
    named = _named(model)
    batch = models.token_batch(seed=5)
    lt, li = _losses(model, batch)
    gt = torch.autograd.grad(lt, [p for _, p in named], retain_graph=True)
    gi = torch.autograd.grad(li, [p for _, p in named], retain_graph=True)
    _, sigma, _ = mimo_weights(torch.stack([lt, li]).detach().double(), f64(2.0, 2.0), 10.0, 0.5)
    alpha, beta = (1 + 10 * sigma).tolist()
    report = pl.backward(text=lt, image=li)
    for (n, p), a, b in zip(named, gt, gi):
        lower = any(f".layers.{i}." in n for i in (0, 1))
        want = alpha * a + beta * b if lower else a + b
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6, msg=n)
    assert report.cases == [int(Case.SUMMED), int(Case.INACTIVE)]
    assert report.groups["group0"]["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert report.groups["group1"]["alpha"] == 1.0
    assert math.isfinite(report.groups["group1"]["ratio"])  # two gradients: statistics are there


def test_nonfinite_loss_raises_in_one_backward_mode():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=2)
    lt, li = _losses(model, models.token_batch())
    with pytest.raises(FloatingPointError):
        pl.backward(text=lt * math.inf, image=li)


def test_state_dict_round_trip():
    m = MIMO()
    m.loss_weights(f64(3.0, 4.0))
    m.loss_weights(f64(2.5, 4.5))
    state = m.state_dict()
    m2 = MIMO()
    m2.load_state_dict(state)
    assert m2.floors.tolist() == [2.5, 4.0] and m2.state_dict()["steps"] == state["steps"]
    c1, _ = m.loss_weights(f64(3.0, 5.0))
    c2, _ = m2.loss_weights(f64(3.0, 5.0))
    assert c1.item() == c2.item()
    # the ParetoLoRA-level object exposes it
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=2)
    pl.backward(*_losses(model, models.token_batch()))
    assert pl.balancer.state_dict()["steps"] == 1 and torch.isfinite(pl.balancer.state_dict()["floors"]).all()


def test_skip_mode_poisons_the_one_backward_step():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=2, on_nonfinite="skip")
    lt, li = _losses(model, models.token_batch())
    report = pl.backward(text=lt, image=li * math.inf)
    assert report.nonfinite and set(report.cases) == {int(Case.NONFINITE)}
    assert all(torch.isnan(p.grad).all() for _, p in _named(model))


def test_several_processes_are_refused(monkeypatch):
    model = models.lora_llama(num_layers=2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="single process"):
        pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=2)


def test_a_failing_backward_changes_no_mimo_state():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=2)
    pl.backward(*_losses(model, models.token_batch(seed=0)))
    floors = pl.balancer.floors.clone()
    lt, li = _losses(model, models.token_batch(seed=1))
    (lt + li).backward()  # frees the graph: the next backward fails
    model.zero_grad()
    with pytest.raises(RuntimeError):
        pl.backward(text=lt * 0.5, image=li * 0.5)
    assert torch.equal(pl.balancer.floors, floors) and pl.micro_batches == 0


@pytest.mark.parametrize("rule", ["mimo", "gradnorm"])
def test_paretolora_state_dict_carries_the_balancer_mid_window(rule):
    def run(split: bool):
        torch.manual_seed(0)
        model = models.lora_llama(num_layers=2)
        pl = pareto_lora.ParetoLoRA(model, rule=rule, num_groups=2, modulate="all")
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for step in range(2):
            for micro in range(2):
                if split and step == 1 and micro == 1:  # checkpoint mid-window, resume in a fresh object
                    state = pl.state_dict()
                    pl = pareto_lora.ParetoLoRA(model, rule=rule, num_groups=2, modulate="all")
                    pl.load_state_dict(state)
                pl.accumulate(*_losses(model, models.token_batch(seed=10 * step + micro)))
            report = pl.integrate_accumulated()
            opt.step()
            opt.zero_grad()
        return report.balancer, [p.detach().clone() for p in model.parameters() if p.requires_grad]

    (b1, p1), (b2, p2) = run(False), run(True)
    assert b1 == pytest.approx(b2, rel=1e-12, nan_ok=True)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_of_another_method_is_refused():
    model = models.lora_llama(num_layers=2)
    state = pareto_lora.ParetoLoRA(model, rule="gradnorm", num_groups=2).state_dict()
    with pytest.raises(ValueError, match="balancer 'gradnorm'.*'mimo'"):
        pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=2).load_state_dict(state)
    with pytest.raises(ValueError, match="balancer None"):
        pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=2).load_state_dict(
            pareto_lora.ParetoLoRA(model, rule="sum", num_groups=2).state_dict())

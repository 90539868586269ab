"""GradNorm: the weight update by hand (float64), and ParetoLoRA(rule=GradNorm) against a plain-torch
implementation of the paper's algorithm (second-order autograd through ||grad_W w_k L_k||) on a tiny LoRA Llama."""

import copy

import pytest
import torch

import pareto_lora
from pareto_lora.training.balancers import GradNorm, gradnorm_update

import models


def f64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_update_by_hand():
    # w = (1, 1), norms (3, 1): G = (3, 1), mean 2; rates L/L0 = (0.5, 1.0) -> r = (2/3, 4/3)
    # alpha = 1: targets = 2 * r = (4/3, 8/3); sign(G - target) = (+1, -1)
    # w - lr * sign * norms = (1 - 0.1*3, 1 + 0.1*1) = (0.7, 1.1) -> renormalised to sum 2: (0.7, 1.1) / 0.9
    new, target, g, r = gradnorm_update(f64(1.0, 1.0), f64(3.0, 1.0), f64(1.0, 2.0), f64(2.0, 2.0), alpha=1.0, lr=0.1)
    torch.testing.assert_close(r, f64(2 / 3, 4 / 3), rtol=1e-15, atol=0)
    torch.testing.assert_close(target, f64(4 / 3, 8 / 3), rtol=1e-15, atol=0)
    torch.testing.assert_close(g, f64(3.0, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(new, f64(0.7 / 0.9, 1.1 / 0.9), rtol=1e-15, atol=1e-15)
    assert float(new.sum()) == pytest.approx(2.0, abs=1e-15)


def test_alpha_zero_pulls_to_equal_weighted_norms_and_min_weight_holds():
    w = f64(1.0, 1.0)
    for _ in range(200):
        w, *_ = gradnorm_update(w, f64(4.0, 1.0), f64(1.0, 1.0), f64(1.0, 1.0), alpha=0.0, lr=0.01)
    # w -> (0.4, 1.6), up to the oscillation of a fixed-step subgradient method
    assert float(w[0]) < 0.5 and float(w[0] * 4.0) == pytest.approx(float(w[1] * 1.0), rel=0.2)
    w, *_ = gradnorm_update(f64(0.01, 1.99), f64(100.0, 0.0), f64(1.0, 1.0), f64(1.0, 1.0), alpha=0.0, lr=1.0,
                            min_weight=1e-3)
    assert float(w.min()) > 0 and float(w.sum()) == pytest.approx(2.0)


def _losses(model, batch):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


def _paper_gradnorm(model, steps, alpha, lr_w, lr):
    """GradNorm as in Chen et al. 2018, Algorithm 1, plain torch: returns the weights of every step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    shared = [p for n, p in named if ".layers.0." in n]  # W: the first layer group's LoRA
    w, initial, seen = torch.ones(2, dtype=torch.float64), None, []
    for step in range(steps):
        lt, li = _losses(model, models.token_batch(seed=step))
        seen.append(w.clone())
        # the network's update uses the weights of this step
        grads = torch.autograd.grad(w[0].float() * lt + w[1].float() * li, params, retain_graph=True)
        wl = w.clone().requires_grad_()
        norms = []
        for k, loss in enumerate((lt, li)):
            gw = torch.autograd.grad(wl[k] * loss.double(), shared, retain_graph=True, create_graph=True)
            norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in gw)))
        G = torch.stack(norms)
        losses = torch.stack([lt, li]).detach().double()
        initial = losses if initial is None else initial
        rate = losses / initial
        target = (G.mean() * (rate / rate.mean()) ** alpha).detach()
        (dw,) = torch.autograd.grad((G - target).abs().sum(), wl)
        w = w - lr_w * dw
        w = 2 * w / w.sum()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return seen, w


def test_matches_the_papers_algorithm_on_a_tiny_llama():
    steps, alpha, lr_w, lr = 5, 1.5, 0.05, 0.5
    model = models.lora_llama(num_layers=3)
    # the paper's G_k is differentiated through the model's backward: eager attention has a double backward
    model.get_base_model().set_attn_implementation("eager")
    twin = copy.deepcopy(model)
    want, want_final = _paper_gradnorm(twin, steps, alpha, lr_w, lr)
    gn = GradNorm(alpha=alpha, lr=lr_w, group=0)
    pl = pareto_lora.ParetoLoRA(model, rule=gn, num_groups=3, modulate="all")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    got = []
    for step in range(steps):
        report = pl.backward(*_losses(model, models.token_batch(seed=step)))
        got.append(torch.tensor([report.balancer["gradnorm/w_text"], report.balancer["gradnorm/w_image"]],
                                dtype=torch.float64))
        assert report.groups["group1"]["alpha"] == pytest.approx(float(got[-1][0]), rel=1e-6)
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(want[-1], torch.ones(2, dtype=torch.float64))  # the weights did move
    for s, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=f"step {s}")
    torch.testing.assert_close(gn.weights, want_final, rtol=2e-5, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_norms_come_from_the_step_statistics_and_report_keys():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, rule="gradnorm", num_groups=2, modulate="all")
    report = pl.backward(*_losses(model, models.token_batch()))
    d = report.as_dict()
    g = report.groups
    # group=None: the modulated groups' statistics summed; G_k = w_k * ||g_k|| with w = (1, 1) at step 1
    nt = (g["group0"]["norm_text"] ** 2 + g["group1"]["norm_text"] ** 2) ** 0.5
    assert d["pareto/gradnorm/gnorm_text"] == pytest.approx(nt, rel=1e-5)
    assert d["pareto/gradnorm/w_text"] == 1.0 and d["pareto/gradnorm/rate_text"] == 1.0
    assert pl.balancer.weights.sum().item() == pytest.approx(2.0)
    assert report.rule == "gradnorm"


def test_state_dict_round_trip_and_bad_parameters():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, rule=GradNorm(lr=0.1), num_groups=2, modulate="all")
    for seed in range(2):
        pl.backward(*_losses(model, models.token_batch(seed=seed)))
    state = pl.balancer.state_dict()
    other = GradNorm(lr=0.1)
    other.load_state_dict(state)
    assert torch.equal(other.weights, pl.balancer.weights) and torch.equal(other.initial, pl.balancer.initial)
    for kw, field in (({"alpha": -1.0}, "alpha"), ({"lr": 0.0}, "lr"), ({"group": -1}, "group"), ({"min_weight": 1.0}, "min_weight")):
        with pytest.raises(ValueError, match=f"^{field}:"):
            GradNorm(**kw)
    with pytest.raises(ValueError, match="^group:"):
        p2 = pareto_lora.ParetoLoRA(model, rule=GradNorm(group=9), num_groups=2)
        p2.backward(*_losses(model, models.token_batch()))

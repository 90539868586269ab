"""stats_ema and preserve_norm with K objectives: a float64 reference over several steps, K = 2 against the
two-objective ParetoLoRA, the no-noise-amplification bound of the rescaling, checkpoints and failures."""

import math

import pytest
import torch

from pareto_lora import ParetoLoRA, RuleSpec
from pareto_lora.multi import gram_matrix, upper_triangle
from pareto_lora.multi import weightings
from pareto_lora.rules import STATIONARY_REL
from pareto_lora.flat import group_of_names
from pareto_lora.training.rule_options import preserve_norm_coeffs, preserve_norm_weights

import models
from test_multi_objective import direct, make, three_losses

BETA = 0.6


@pytest.fixture(scope="module")
def llama():
    return models.lora_llama(num_layers=4)


def per_group_grads(model, losses, pl):
    """(param names, per objective the float64 gradients, per group the Gram)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    per_loss = [[g.double() for g in torch.autograd.grad(losses[k], params, retain_graph=True)] for k in pl.objectives]
    _, grams = direct(model, losses, pl, RuleSpec("sum"))
    return names, per_loss, grams


@pytest.mark.parametrize("rule", ["upgrad", "mgda", "imtl_g"])
def test_stats_ema_and_preserve_norm_equal_a_float64_reference_over_steps(llama, rule):
    # The reference: the EMA of each group's float64 Gram (the first step starts it), the weighting on it,
    # the weights rescaled so that ||sum_k w_k g_k|| = ||sum_k g_k|| from this step's Gram (no stationarity here).
    pl = make(llama, rule=rule, stats_ema=BETA, preserve_norm=True, modulate="all")
    spec, ema = RuleSpec(rule), {}
    for step, seed in enumerate((11, 12, 13)):
        batch = models.token_batch(seed=seed)
        losses = three_losses(llama, batch)
        names, per_loss, grams = per_group_grads(llama, losses, pl)
        report = pl.backward(**three_losses(llama, batch))
        got, group = dict(zip(names, (p.grad for p in pl.layout.params))), group_of_names(pl.layout)
        for gi, g in enumerate(pl.layout.group_names):
            gram = gram_matrix(grams[g], 3)
            ema[g] = gram if step == 0 else BETA * ema[g] + (1 - BETA) * gram
            w, case = weightings.apply(spec, ema[g][None], pl.layout.active[gi : gi + 1], torch.float64)
            w = w[0]
            factor = math.sqrt(gram.sum() / (w @ gram @ w))
            assert report.groups[g]["case"] == case.item()
            assert list(report.groups[g]["weights"].values()) == pytest.approx((factor * w).tolist(), rel=1e-5)
            torch.testing.assert_close(report.group_stats[gi], grams[g], rtol=1e-9, atol=0)  # the step's own Gram
            want_norm2, got_norm2 = 0.0, 0.0
            for i, n in enumerate(names):
                if group[n] != g:
                    continue
                want = factor * sum(w[k] * per_loss[k][i] for k in range(3))
                torch.testing.assert_close(got[n].double(), want, rtol=1e-5, atol=1e-7 * want.abs().max().item())
                want_norm2 += float(sum(per_loss[k][i] for k in range(3)).square().sum())
                got_norm2 += float(got[n].double().square().sum())
            assert got_norm2 == pytest.approx(want_norm2, rel=1e-5)  # the norm of the plain sum, kept
        want = torch.stack([upper_triangle(ema[g]) for g in pl.layout.group_names])
        torch.testing.assert_close(pl.options._ema, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("rule", ["mgda", "upgrad", "mean"])
def test_two_objectives_with_the_options_equal_the_two_objective_paretolora(llama, rule):
    two = ParetoLoRA(llama, rule=rule, num_groups=2, modulate="all", stats_ema=BETA, preserve_norm=True,
                     backend="reference")
    many = make(llama, rule=rule, objectives=("answer", "image"), modulate="all", stats_ema=BETA, preserve_norm=True)
    for seed in (21, 22, 23):
        losses = three_losses(llama, models.token_batch(seed=seed))
        r2 = two.backward(text=losses["answer"], image=losses["image"])
        want = [p.grad.clone() for p in two.layout.params]
        losses = three_losses(llama, models.token_batch(seed=seed))
        rk = many.backward(answer=losses["answer"], image=losses["image"])
        for p, w in zip(many.layout.params, want):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-8)
        assert rk.cases == r2.cases
        for g, row in rk.groups.items():
            assert list(row["weights"].values()) == pytest.approx([r2.groups[g]["alpha"], r2.groups[g]["beta"]], rel=1e-5)
    # The running averages hold the same Gram entries, in each mode's order (aa, ab, bb) vs (aa, bb, ab).
    torch.testing.assert_close(many.options._ema, two.options._ema[:, [0, 2, 1]], rtol=1e-9, atol=0)


def test_preserve_norm_weights_at_two_objectives_is_preserve_norm_coeffs_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(400, 30, generator=gen, dtype=torch.float64), torch.randn(400, 30, generator=gen, dtype=torch.float64)
    b[:100] = -a[:100] * torch.rand(100, 1, generator=gen, dtype=torch.float64) + 1e-9 * b[:100]  # near-stationary
    coeffs = torch.rand(400, 2, generator=gen)
    stats = torch.stack([(a * a).sum(1), (b * b).sum(1), (a * b).sum(1)], 1)
    gram = torch.stack([stats[:, 0], stats[:, 2], stats[:, 2], stats[:, 1]], 1).reshape(-1, 2, 2)
    assert torch.equal(preserve_norm_weights(coeffs, gram), preserve_norm_coeffs(coeffs, stats))


def _vectors(gen, k, kind):
    g = torch.randn(k, 64, generator=gen, dtype=torch.float64)
    if kind == "zero":
        return torch.zeros_like(g)
    if kind == "tiny_sum":  # sum_k g_k at rounding level: ||sum|| is not resolved by the Gram
        g[-1] = -g[:-1].sum(0) + 1e-12 * torch.randn(64, generator=gen, dtype=torch.float64)
    if kind == "opposed":  # a Pareto-stationary set: MGDA's min-norm point is (nearly) zero
        g[1] = -g[0] * (1 + 1e-10)
    if kind == "scaled":
        g = g * torch.logspace(-6, 6, k, dtype=torch.float64)[:, None]
    return g


@pytest.mark.parametrize("kind", ["random", "zero", "tiny_sum", "opposed", "scaled"])
@pytest.mark.parametrize("rule", ["mgda", "upgrad", "mean", "nash_mtl"])
def test_preserve_norm_never_amplifies_rounding_noise(kind, rule):
    # The stated bound: ||out|| <= max(1.065 ||sum_k g_k||, ||sum_k w_k g_k||) plus the float32 rounding of
    # the stored weights, on a Gram that carries a relative error up to STATS_REL_ERR (here 2^-21 per entry).
    gen = torch.Generator().manual_seed(7)
    for k in (2, 3, 5, 8):
        for _ in range(6):
            g = _vectors(gen, k, kind)
            exact = g @ g.T
            r = torch.rand(k, k, generator=gen, dtype=torch.float64) * 2 - 1
            noisy = exact * (1 + 2.0**-21 * (r + r.T) / 2)
            w, _ = weightings.apply(RuleSpec(rule), noisy[None], None, torch.float32)
            scaled = preserve_norm_weights(w, noisy[None])[0].double()
            out, before, plain = scaled @ g, w[0].double() @ g, g.sum(0)
            rounding = 2.0**-23 * float((scaled.abs() + w[0].double().abs()) @ g.norm(dim=1))
            bound = max(1.065 * plain.norm().item(), before.norm().item()) + rounding
            assert out.norm().item() <= bound, (k, kind, rule, out.norm().item(), bound)
            if kind == "zero":
                assert torch.equal(scaled, w[0].double())


@pytest.mark.parametrize("delta, scaled", [(STATIONARY_REL, False), (4 * STATIONARY_REL, True)])
def test_the_cut_between_an_unresolved_and_a_resolved_combination(delta, scaled):
    # a = -b up to delta: ||0.5 a + 0.5 b||^2 = delta / 2 against the cut STATIONARY_REL (0.5 + 0.5)^2,
    # ||a + b||^2 = 2 delta against STATIONARY_REL (1 + 1)^2; resolved, the factor is sqrt(4) = 2.
    gram = torch.tensor([[[1.0, -1 + delta, 0.0], [-1 + delta, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.5, 0.0]])
    got = preserve_norm_weights(w, gram)
    assert torch.equal(got, 2 * w if scaled else w)


def test_options_state_round_trips_and_a_bad_one_changes_nothing(llama):
    a = make(llama, rule="upgrad", stats_ema=BETA, preserve_norm=True)
    a.backward(**three_losses(llama, models.token_batch(seed=31)))
    a.accumulate(**three_losses(llama, models.token_batch(seed=32)))
    state = a.state_dict()
    assert state["options"]["ema"].shape == (a.layout.num_groups, 6)
    b = make(llama, rule="upgrad", stats_ema=BETA, preserve_norm=True)
    bad = dict(state, options=dict(state["options"], ema=torch.zeros(a.layout.num_groups, 3)))
    with pytest.raises(ValueError, match=r"state: options: expected the stats_ema average .* shape \[2, 6\]"):
        b.load_state_dict(bad)
    assert b.options._ema is None and b.micro_batches == 0
    b.load_state_dict(state)
    assert torch.equal(b.options._ema, a.options._ema)
    ra = a.integrate_accumulated()
    want = [p.grad.clone() for p in a.layout.params]
    rb = b.integrate_accumulated()
    assert all(torch.equal(p.grad, w) for p, w in zip(b.layout.params, want))
    assert rb.groups == ra.groups and torch.equal(b.options._ema, a.options._ema)
    old = {k: v for k, v in state.items() if k != "options"}  # a checkpoint from before the options
    make(llama, rule="upgrad", stats_ema=BETA).load_state_dict(old)


def test_a_nonfinite_step_never_enters_the_average_and_a_failed_weighting_leaves_it(llama):
    calls = {"fail": False}  # a user weighting: the options wrap every kind of K rule

    def weighting(gram):
        if calls["fail"]:
            raise RuntimeError("weighting failed")
        return 1.0 / torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()

    pl = make(llama, rule=weighting, stats_ema=BETA)
    pl.backward(**three_losses(llama, models.token_batch(seed=41)))
    ema = pl.options._ema.clone()
    losses = three_losses(llama, models.token_batch(seed=42))
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # overflows the float32 losses: a non-finite Gram
    report = pl.backward(**losses, scaler=scaler)
    assert report.nonfinite and torch.equal(pl.options._ema, ema)
    calls["fail"] = True
    with pytest.raises(RuntimeError, match="weighting failed"):
        pl.backward(**three_losses(llama, models.token_batch(seed=43)))
    assert torch.equal(pl.options._ema, ema)


def test_balancers_stay_refused_with_the_reason(llama):
    with pytest.raises(ValueError, match="balancer: not supported with K objectives .*two-objective"):
        make(llama, balancer="mimo")
    assert make(llama, preserve_norm=True).python_rule is not None and make(llama).python_rule is None


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_a_step_with_a_nonfinite_loss_leaves_the_average(llama, mode):
    # One loss infinite, every gradient finite: the Gram is finite, only the loss makes the step bad;
    # refused or skipped, it never enters the average (the next step as if it never happened).
    pl = make(llama, rule="upgrad", stats_ema=BETA, on_nonfinite=mode)
    twin = make(llama, rule="upgrad", stats_ema=BETA)
    for p in (pl, twin):
        p.backward(**three_losses(llama, models.token_batch(seed=41)))
    ema = pl.options._ema.clone()
    losses = three_losses(llama, models.token_batch(seed=42))
    losses["answer"] = losses["answer"] + float("inf")
    if mode == "skip":
        assert pl.backward(**losses).nonfinite
    else:
        with pytest.raises(FloatingPointError, match="answer loss is not finite"):
            pl.backward(**losses)
    assert torch.equal(pl.options._ema, ema)
    got, want = (p.backward(**three_losses(llama, models.token_batch(seed=43))) for p in (pl, twin))
    assert got.groups == want.groups  # norms, cosines, weights and cases, exactly
    assert torch.equal(pl.options._ema, twin.options._ema)

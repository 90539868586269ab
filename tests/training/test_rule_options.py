"""Issue 13's options beyond the paper: statistics smoothed over steps, the norm-preserving mode,
and the warning for a norm-increasing rule under SGD."""

import warnings

import pytest
import torch

import pareto_lora
from pareto_lora import RuleSpec
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
        _, want_cases = pareto_lora.rule_coefficients(ema, "pareto_lora", active=pl.layout.active, backend="reference")
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


# ---- issue 27: preserve_norm never amplifies rounding noise; stats_ema never averages a bad step ----
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pareto_lora.rules import STATS_REL_ERR  # noqa: E402


def norm_bound(a, b, coeffs):
    """preserve_norm_coeffs' stated bound on ||out||: max(1.065 ||a + b||, ||alpha a + beta b||) with the
    rule's own (alpha, beta), plus the float32 rounding of the stored coefficients."""
    al, be = coeffs[0].item(), coeffs[1].item()
    own = (al * a + be * b).norm().item()
    rounding = 2.0**-23 * (abs(al) * a.norm().item() + abs(be) * b.norm().item())
    return max(1.065 * (a + b).norm().item(), own) + rounding


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 3000), c=st.floats(0.05, 20.0),
       log_rel=st.floats(-10.0, 0.0), rule=st.sampled_from(["mgda", "pareto_lora", "pareto_only", "rescale_only"]))
def test_preserve_norm_bound_near_pareto_stationary_pairs(seed, n, c, log_rel, rule):
    # b = -c a + a small perturbation: the min-norm combination is at rounding-noise level, where
    # scaling it up to ||a + b|| used to give ||out|| up to 7x ||a + b|| (coefficients ~1e8)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen)
    b = (-c * a + 10.0**log_rel * torch.randn(n, generator=gen)).float()
    stats = pareto_lora.segment_stats(a, b, torch.tensor([0, n]))
    plain, _ = pareto_lora.rule_coefficients(stats, rule, backend="reference")
    coeffs, _ = RuleOptions(preserve_norm=True).apply(stats, lambda s: pareto_lora.rule_coefficients(s, rule, backend="reference"))
    out = coeffs[0, 0].double() * a.double() + coeffs[0, 1].double() * b.double()
    assert out.norm().item() <= norm_bound(a.double(), b.double(), plain[0].double())


def test_preserve_norm_bound_is_tight_enough_to_fail_the_old_scaling():
    # the same pair scaled to ||a + b|| from the statistics alone (no stationarity cut): 1.7x the bound
    gen = torch.Generator().manual_seed(14)
    a = torch.randn(1000, generator=gen)
    b = (-0.7 * a + 1e-8 * torch.randn(1000, generator=gen)).float()
    stats = pareto_lora.segment_stats(a, b, torch.tensor([0, 1000]))
    plain, _ = pareto_lora.rule_coefficients(stats, "mgda", backend="reference")
    s, (al, be) = stats.double()[0], plain[0].double()
    now = al**2 * s[0] + be**2 * s[1] + 2 * al * be * s[2]
    naive = plain.double() * ((s[0] + s[1] + 2 * s[2]).clamp_min(0) / now).sqrt()
    out = naive[0, 0] * a.double() + naive[0, 1] * b.double()
    assert out.norm().item() > 1.5 * norm_bound(a.double(), b.double(), plain[0].double())


_MODEL = {}


def _near_stationary_model():
    if not _MODEL:
        _MODEL["m"] = models.lora_llama(num_layers=2)
    return _MODEL["m"]


@settings(max_examples=8, deadline=None, derandomize=True)
@given(c=st.floats(0.1, 10.0), log_rel=st.floats(-9.0, -1.0), seed=st.integers(0, 1000))
def test_preserve_norm_bound_through_paretolora(c, log_rel, seed):
    # image loss = -c * text loss + a small other loss: g_image ~ -c g_text in every group
    model = _near_stationary_model()
    batch = models.token_batch(seed=seed)
    pl = ParetoLoRA(model, rule="mgda", num_groups=2, modulate="all", preserve_norm=True)

    def losses():
        logits = model(**models.model_inputs(batch)).logits
        s = logits.float().square().mean()
        return s, -c * s + 10.0**log_rel * logits.float()[..., :3].mean()

    t, i = losses()
    params = pl.layout.params
    a = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
    b = torch.autograd.grad(i, params, allow_unused=True)
    plain = ParetoLoRA(model, rule="mgda", num_groups=2, modulate="all").backward(*losses()).step.coeffs
    report = pl.backward(*losses())
    ug = pl.layout.unit_group.tolist()
    for g in range(pl.layout.num_groups):
        idx = [k for k, u in enumerate(pl.layout.param_unit) if ug[u] == g and a[k] is not None]
        cat = lambda xs: torch.cat([xs[k].double().flatten() for k in idx])  # noqa: E731
        ga, gb, out = cat(a), cat(b), cat([p.grad for p in params])
        assert out.norm().item() <= norm_bound(ga, gb, plain[g].double()) * (1 + 1e-6), (g, report.cases)


def test_stats_ema_a_nonfinite_first_step_does_not_enter_the_average():
    opts = RuleOptions(stats_ema=0.5)
    seen = []
    rule = lambda s: (seen.append(s.clone()) or torch.ones(s.shape[0], 2), torch.zeros(s.shape[0], dtype=torch.int32))  # noqa: E731
    nan = float("nan")
    opts.apply(torch.tensor([[nan, 1.0, 0.0], [4.0, 1.0, 0.0]], dtype=torch.float64), rule)
    opts.apply(torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64), rule)
    opts.apply(torch.tensor([[4.0, 3.0, 1.0], [float("inf"), 1.0, 0.0]], dtype=torch.float64), rule)
    assert torch.isnan(seen[0][0, 0])  # the bad step itself reaches the rule (NONFINITE)
    assert seen[1].tolist() == [[2.0, 1.0, 0.0], [3.0, 1.0, 0.0]]  # group 0 starts at its first finite step
    assert seen[2][0].tolist() == [3.0, 2.0, 0.5] and torch.isfinite(seen[2][1, 1:]).all()
    assert torch.isfinite(opts.state_dict()["ema"]).all()


def test_stats_ema_after_a_nonfinite_first_step_in_training(llama):
    pl = ParetoLoRA(llama, rule="pareto_lora", num_groups=3, modulate="all", stats_ema=0.5, on_nonfinite="skip")
    lt, li = losses_of(llama, models.token_batch(seed=1))
    report = pl.backward(text=lt, image=li * float("inf"))  # inf/NaN gradients: a skipped step
    assert set(report.cases) == {int(pareto_lora.Case.NONFINITE)}
    for seed in (2, 3):
        report = pl.backward(*losses_of(llama, models.token_batch(seed=seed)))
        assert int(pareto_lora.Case.NONFINITE) not in report.cases


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_stats_ema_a_step_with_a_nonfinite_loss_leaves_the_average(llama, mode):
    # An infinite image loss with finite gradients: the statistics are finite, only the loss makes the
    # step bad. Refused ("raise") or skipped ("skip": NaN gradients, NONFINITE), it must not enter the
    # average: the next step's rule sees what it would have seen had the bad step never happened.
    pl = ParetoLoRA(llama, rule="pareto_lora", num_groups=3, modulate="all", stats_ema=0.5, on_nonfinite=mode)
    twin = ParetoLoRA(llama, rule="pareto_lora", num_groups=3, modulate="all", stats_ema=0.5)
    for p in (pl, twin):
        p.backward(*losses_of(llama, models.token_batch(seed=1)))
    ema = pl.options._ema.clone()
    lt, li = losses_of(llama, models.token_batch(seed=2))
    if mode == "skip":
        assert pl.backward(text=lt, image=li + float("inf")).nonfinite
    else:
        with pytest.raises(FloatingPointError, match="image loss is not finite"):
            pl.backward(text=lt, image=li + float("inf"))
    assert torch.equal(pl.options._ema, ema)
    got, want = (p.backward(*losses_of(llama, models.token_batch(seed=3))) for p in (pl, twin))
    assert torch.equal(got.step.coeffs, want.step.coeffs) and got.cases == want.cases
    assert torch.equal(pl.options._ema, twin.options._ema)


def test_stats_ema_a_skipped_first_step_leaves_no_average(llama):
    pl = ParetoLoRA(llama, rule="pareto_lora", num_groups=3, modulate="all", stats_ema=0.5, on_nonfinite="skip")
    lt, li = losses_of(llama, models.token_batch(seed=2))
    assert pl.backward(text=lt, image=li + float("inf")).nonfinite
    ema = pl.options.state_dict()["ema"]
    assert ema is None or bool(ema.isnan().all())  # every group "not seen yet" (no host sync to tell None)
    twin = ParetoLoRA(llama, rule="pareto_lora", num_groups=3, modulate="all", stats_ema=0.5)
    got, want = (p.backward(*losses_of(llama, models.token_batch(seed=3))) for p in (pl, twin))
    assert torch.equal(got.step.coeffs, want.step.coeffs) and torch.equal(pl.options._ema, twin.options._ema)


# ---- the K-objective step's check_optimizer: one classification of the rules, K-aware ----------------
def _gradient_sets(k: int, n: int = 150, dim: int = 6) -> torch.Tensor:
    """[6n + 2000, k, dim] float64: random, cancelling (the last minus the others, up to 1e-6), a near-opposite
    pair, norms over 6 decades, tiny (1e-4) and nearly equal gradients: where a rule's norm can exceed the sum's."""
    gen = torch.Generator().manual_seed(k)
    g = torch.randn(6, n, k, dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    g[1, :, -1] = -g[1, :, :-1].sum(1) + 1e-6 * noise
    g[2, :, 1] = -g[2, :, 0] + 1e-2 * noise
    g[3] = g[3] * torch.logspace(-3, 3, k, dtype=torch.float64)[:, None]
    g[4] = g[4] * 1e-4
    g[5] = g[5, :, :1] + 0.05 * g[5]
    # More cancelling sets: imtl_g's longer outputs at K = 3 are rare (1 of these 2000; 12 at K = 4).
    gen = torch.Generator().manual_seed(0)
    more = torch.randn(2000, k, dim, generator=gen, dtype=torch.float64)
    more[:, -1] = -more[:, :-1].sum(1) + 1e-6 * torch.randn(2000, dim, generator=gen, dtype=torch.float64)
    return torch.cat([g.reshape(6 * n, k, dim), more])


LENGTH_SPECS = [RuleSpec(r) for r in ("sum", "mean", "mgda", "upgrad", "dualproj", "pcgrad", "imtl_g", "aligned_mtl",
                                      "nash_mtl", "config", "cagrad")] + [
    RuleSpec("cagrad", c=1.5), RuleSpec("cagrad", c=2.5), RuleSpec("nash_mtl", max_norm=0.0)]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_can_lengthen_is_what_the_rules_do(k):
    # Both ways: a rule said never to lengthen is never longer than the plain sum on these gradients, and
    # one said to can is longer on some of them (the classification check_optimizer warns by).
    from pareto_lora.multi import weightings
    from pareto_lora.training.rule_options import can_lengthen

    g = _gradient_sets(k)
    gram = g @ g.transpose(1, 2)
    plain = g.sum(1).norm(dim=1)
    specs = LENGTH_SPECS + [RuleSpec("constant", weights=w) for w in ((1.0,) * k, (0.5,) * k, (1.5,) * k,
                                                                      (2.0,) + (1.0,) * (k - 1))]
    for spec in specs:
        w, _ = weightings.apply(spec, gram, torch.ones(gram.shape[0], dtype=torch.bool), torch.float64)
        ratio = ((w.double()[:, :, None] * g).sum(1).norm(dim=1) / plain).max().item()
        if can_lengthen(spec, k):
            assert ratio > 1.001, (spec, k, ratio)
        else:
            assert ratio <= 1 + 1e-9, (spec, k, ratio)


def test_the_k_objective_step_checks_the_optimizer_as_the_two_objective_one(llama):
    # MultiObjectiveLoRA.check_optimizer: the same function, K-aware; at K = 2 the two-objective answer.
    from pareto_lora.multi.weightings import K_RULES

    params = [p for p in llama.parameters() if p.requires_grad]
    sgd, adam = torch.optim.SGD(params, lr=0.1), torch.optim.AdamW(params)
    three = ("prompt", "answer", "image")
    with pytest.warns(UserWarning, match="rule 'upgrad' can lengthen the gradient and SGD"):
        assert ParetoLoRA(llama, rule="upgrad", num_groups=2, objectives=three).check_optimizer(sgd)
    with pytest.warns(UserWarning, match="a user-defined weighting can lengthen"):
        ParetoLoRA(llama, rule=lambda gram: torch.ones(gram.shape[:-1]), num_groups=2, objectives=three).check_optimizer(sgd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ParetoLoRA(llama, rule="upgrad", num_groups=2, objectives=three).check_optimizer(adam) is None
        assert ParetoLoRA(llama, rule="upgrad", num_groups=2, objectives=three,
                          preserve_norm=True).check_optimizer(sgd) is None
        assert ParetoLoRA(llama, rule="mgda", num_groups=2, objectives=three).check_optimizer(sgd) is None
        for rule in K_RULES:
            two = ParetoLoRA(llama, rule=rule, num_groups=2, modulate="all")
            many = ParetoLoRA(llama, rule=rule, num_groups=2, modulate="all", objectives=("answer", "image"))
            try:
                want = two.check_optimizer(sgd)
            except UserWarning as w:
                want = str(w)
            try:
                got = many.check_optimizer(sgd)
            except UserWarning as w:
                got = str(w)
            assert got == want, rule

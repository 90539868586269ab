"""Balancers as their own argument (issue 23) and their reliability (issue 27): the balancer= argument
and its rule shorthand, the sync contract without forwarding, the rule validated once, balancer state
untouched by refused or non-finite steps, GradNorm waiting for a positive first loss, and whole-state
checks of balancer and option checkpoints."""

import math

import pytest
import torch

import pareto_lora
from pareto_lora import RuleSpec
from pareto_lora.distributed.sync import GradSync
from pareto_lora.flat import FlatStep
from pareto_lora.training.balancers import GradNorm, MIMO, BalancedSync

import models


def _losses(model, seed=0):
    batch = models.token_batch(seed=seed)
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


def _grads(pl):
    return [p.grad.clone() for p in pl.layout.params]


# ---- the balancer argument ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: MIMO(lam=20), lambda: MIMO(per_group=True), lambda: GradNorm(lr=0.1),
                                  lambda: "mimo", lambda: "gradnorm"])
def test_balancer_argument_is_the_rule_shorthand_bitwise(make):
    model = models.lora_llama(num_layers=2)
    got = []
    for kw in (dict(rule=make()), dict(balancer=make()), dict(rule="sum", balancer=make()),
               dict(rule=RuleSpec("sum"), balancer=make())):
        pl = pareto_lora.ParetoLoRA(model, num_groups=2, modulate="all", **kw)
        reports = [pl.backward(*_losses(model, seed)) for seed in range(2)]
        got.append((_grads(pl), reports[-1].balancer, pl.rule))
    for grads, bal, rule in got[1:]:
        assert all(torch.equal(x, y) for x, y in zip(grads, got[0][0]))
        assert bal == pytest.approx(got[0][1], nan_ok=True, rel=0, abs=0) and rule == got[0][2]


@pytest.mark.parametrize("kw, match", [
    (dict(rule="mgda", balancer="mimo"), r"^rule: expected 'sum' \(or None\) with the 'mimo' balancer"),
    (dict(rule=RuleSpec("pareto_lora"), balancer=MIMO()), r"^rule: expected 'sum'"),
    (dict(rule="mimo", balancer="gradnorm"), r"^balancer: expected None when rule is a balancer"),
    (dict(balancer="mimoo"), r"^balancer: expected None, one of mimo, gradnorm or a Balancer"),
    (dict(balancer=5), r"^balancer: expected None"),
    (dict(balancer="gradnorm", tau=0.5), r"^tau: expected None with the 'gradnorm' balancer"),
    (dict(balancer="mimo", stats_ema=0.5), r"^stats_ema, preserve_norm: expected a kernel rule"),
])
def test_balancer_argument_refusals(kw, match):
    model = models.lora_llama(num_layers=2)
    with pytest.raises(ValueError, match=match):
        pareto_lora.ParetoLoRA(model, num_groups=2, **kw)


def test_default_rule_is_pareto_lora_without_a_balancer_and_sum_with_one():
    model = models.lora_llama(num_layers=2)
    assert pareto_lora.ParetoLoRA(model, num_groups=2).spec == RuleSpec("pareto_lora")
    pl = pareto_lora.ParetoLoRA(model, num_groups=2, balancer="mimo")
    assert pl.spec == RuleSpec("sum") and pl.rule == "mimo"


def test_balanced_sync_implements_the_contract_without_forwarding():
    assert "__getattr__" not in vars(BalancedSync)
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, num_groups=2, balancer="gradnorm")
    sync = pl._sync
    assert isinstance(sync, BalancedSync)
    members = [n for n in vars(GradSync) if not n.startswith("_")] + list(GradSync.__annotations__)
    for name in set(members):
        assert name in vars(BalancedSync) or name in vars(sync), name


def test_the_rule_is_validated_once_per_construction_not_per_step(monkeypatch):
    import pareto_lora.training.balancers as bal

    model = models.lora_llama(num_layers=2)
    calls = {"as_spec": 0, "post_init": 0}
    as_spec, post_init = bal.as_spec, RuleSpec.__post_init__

    def counting_as_spec(*a, **k):
        calls["as_spec"] += 1
        return as_spec(*a, **k)

    def counting_post_init(self):
        calls["post_init"] += 1
        post_init(self)

    monkeypatch.setattr(bal, "as_spec", counting_as_spec)
    monkeypatch.setattr(RuleSpec, "__post_init__", counting_post_init)
    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", tau=0.3, num_groups=2, stats_ema=0.5, preserve_norm=True)
    assert calls == {"as_spec": 1, "post_init": 1}
    for seed in range(2):
        pl.backward(*_losses(model, seed))
    assert calls == {"as_spec": 1, "post_init": 1}


# ---- numerics: refused and non-finite steps leave the balancer as it was --------------------------
@pytest.mark.parametrize("per_group", [False, True])
def test_mimo_floors_untouched_by_a_refused_step(per_group):
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, num_groups=2, rule=MIMO(per_group=per_group))
    pl.backward(*_losses(model, 0))
    state = pl.balancer.state_dict()
    lt, li = _losses(model, 1)
    with pytest.raises(FloatingPointError, match="image loss is not finite"):
        pl.backward(text=lt * 0.01, image=li * math.inf)  # text 0.01 x: would be a new minimum
    assert torch.equal(pl.balancer.floors, state["floors"]) and int(pl.balancer.steps) == state["steps"]


@pytest.mark.parametrize("balancer", [MIMO, lambda: MIMO(per_group=True), GradNorm])
def test_a_skipped_step_changes_no_balancer_state(balancer):
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, num_groups=2, modulate="all", rule=balancer(), on_nonfinite="skip")
    for seed in range(2):
        pl.backward(*_losses(model, seed))
    before = pl.balancer.state_dict()
    lt, li = _losses(model, 5)
    report = pl.backward(text=lt * 0.01, image=li * math.nan)
    assert report.nonfinite
    for key, value in pl.balancer.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)
        else:
            assert value == before[key], key


def _observe(gn, losses, stats=((4.0, 1.0, 0.0),)):
    step = FlatStep(torch.zeros(1, 3), torch.tensor(stats, dtype=torch.float64), torch.ones(1, 2), torch.zeros(1))
    gn.observe(step, torch.tensor(losses, dtype=torch.float64))


@pytest.mark.parametrize("first_image_loss", [0.0, -1.0, math.inf, math.nan])
def test_gradnorm_waits_for_the_first_positive_finite_loss(first_image_loss):
    gn = GradNorm(lr=0.1)
    gn.bind(torch.device("cpu"), 1)
    gn._active = torch.ones(1, dtype=torch.bool)
    _observe(gn, (2.0, first_image_loss))  # a batch without image tokens (or a bad one)
    assert gn.weights.tolist() == [1.0, 1.0]
    first_text = 2.0 if math.isfinite(first_image_loss) else math.nan  # a non-finite step sets nothing
    torch.testing.assert_close(gn.initial[0], torch.tensor(first_text, dtype=torch.float64), equal_nan=True)
    assert math.isnan(gn.initial[1].item())
    _observe(gn, (1.8, 3.0))  # the first batch with image tokens sets L_image(0)
    assert gn.initial.tolist() == [2.0 if math.isfinite(first_image_loss) else 1.8, 3.0]
    _observe(gn, (1.0, 2.9))
    assert gn.weights[0].item() != 1.0  # the weights move (before: frozen for ever)
    moved = gn.weights.clone()
    _observe(gn, (1.0, 0.0))  # a later batch without image tokens tells nothing about its rate
    assert torch.equal(gn.weights, moved)


def test_gradnorm_through_paretolora_after_a_first_batch_without_image_loss():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, num_groups=2, modulate="all", rule=GradNorm(lr=0.2))
    lt, li = _losses(model, 0)
    pl.backward(text=lt, image=li * 0.0)
    for seed in (1, 2, 3):
        pl.backward(*_losses(model, seed))
    assert pl.balancer.initial[1].item() > 0 and pl.balancer.weights[0].item() != 1.0


# ---- checkpoints: the whole state is checked before any of it is applied --------------------------
def _state_of(rule_kw, num_groups=3, steps=2):
    model = models.lora_llama(num_layers=3)
    pl = pareto_lora.ParetoLoRA(model, num_groups=num_groups, modulate="all", **rule_kw)
    for seed in range(steps):
        pl.backward(*_losses(model, seed))
    return model, pl


def _same(x, y):
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


def _bad(kind):
    def edit(state):
        bal, opts = state["balancer"], state["options"]
        if kind == "floors1":
            bal["state"]["floors"] = torch.zeros(1, dtype=torch.float64)
        elif kind == "floors_list":
            bal["state"]["floors"] = [1.0, 2.0]
        elif kind == "floors_missing":
            del bal["state"]["floors"]
        elif kind == "steps_str":
            bal["state"]["steps"] = "2"
        elif kind == "weights3":
            bal["state"]["weights"] = torch.ones(3, dtype=torch.float64)
        elif kind == "weights_neg":
            bal["state"]["weights"] = torch.tensor([-1.0, 3.0], dtype=torch.float64)
        elif kind == "initial_zero":
            bal["state"]["initial"] = torch.tensor([0.0, 1.0], dtype=torch.float64)
        elif kind == "floors_inf":
            bal["state"]["floors"] = torch.tensor([-math.inf, 1.0], dtype=torch.float64)
        elif kind == "initial_missing":
            del bal["state"]["initial"]
        elif kind == "balancer_state_none":
            bal["state"] = None
        elif kind == "window":
            bal["window_losses"] = torch.zeros(5)
        elif kind == "ema1":
            opts["ema"] = torch.zeros(1, 3, dtype=torch.float64)
        elif kind == "ema_inf":
            opts["ema"] = torch.full((3, 3), math.inf, dtype=torch.float64)
        elif kind == "ema_list":
            opts["ema"] = [[0.0] * 3] * 3
        elif kind == "options_str":
            state["options"] = "ema"
        return state
    return edit


@pytest.mark.parametrize("rule_kw, kind", [
    (dict(rule="mimo"), "floors1"), (dict(rule="mimo"), "floors_list"),
    (dict(rule="mimo"), "floors_missing"), (dict(rule="mimo"), "steps_str"),
    (dict(rule="mimo"), "window"), (dict(rule="mimo"), "balancer_state_none"),
    (dict(rule="gradnorm"), "weights3"), (dict(rule="gradnorm"), "weights_neg"),
    (dict(rule="gradnorm"), "initial_missing"), (dict(rule="gradnorm"), "initial_zero"),
    (dict(rule="mimo"), "floors_inf"),
    (dict(rule="pareto_lora", stats_ema=0.5), "ema1"), (dict(rule="pareto_lora", stats_ema=0.5), "ema_inf"),
    (dict(rule="pareto_lora", stats_ema=0.5), "ema_list"), (dict(rule="pareto_lora", stats_ema=0.5), "options_str"),
])
def test_a_bad_balancer_or_options_state_is_refused_whole(rule_kw, kind):
    model, pl = _state_of(rule_kw)
    lt, li = _losses(model, 7)
    pl.accumulate(lt, li)  # mid-window: the window must survive the refused load too
    before = pl.state_dict()
    bad = _bad(kind)(pl.state_dict())
    with pytest.raises(ValueError, match=r"^state: "):
        pl.load_state_dict(bad)
    assert _same(pl.state_dict(), before)


def test_a_one_group_stats_ema_state_into_three_groups_is_refused():
    _, small = _state_of(dict(rule="pareto_lora", stats_ema=0.5), num_groups=1)
    _, pl = _state_of(dict(rule="pareto_lora", stats_ema=0.5), num_groups=3)
    before = pl.state_dict()
    with pytest.raises(ValueError, match=r"^state: expected the stats_ema average as a float tensor of shape \[3, 3\]"):
        pl.load_state_dict(small.state_dict())
    assert _same(pl.state_dict(), before)


@pytest.mark.parametrize("rule_kw", [dict(rule="mimo"), dict(rule="gradnorm"),
                                     dict(rule="pareto_lora", stats_ema=0.5)])
def test_a_good_state_still_round_trips(rule_kw):
    model, pl = _state_of(rule_kw)
    state = pl.state_dict()
    other = pareto_lora.ParetoLoRA(model, num_groups=3, modulate="all", **rule_kw)
    other.load_state_dict(state)
    assert _same(other.state_dict(), state)


def test_assigning_spec_is_checked():
    model = models.lora_llama(num_layers=2)
    pl = pareto_lora.ParetoLoRA(model, num_groups=2)
    pl.spec = RuleSpec("mgda")
    assert pl.rule == "mgda"
    with pytest.raises(ValueError, match="^spec: expected a pareto_lora.RuleSpec"):
        pl.spec = "mgda"
    bal = pareto_lora.ParetoLoRA(model, num_groups=2, balancer="mimo")
    with pytest.raises(ValueError, match="^spec: expected the 'sum' rule under the 'mimo' balancer"):
        bal.spec = RuleSpec("mgda")
    assert pl.spec == RuleSpec("mgda") and bal.spec == RuleSpec("sum")

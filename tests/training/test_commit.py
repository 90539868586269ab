"""CoMMIT: the KL drift by hand, kappa at its limits (one side frozen: 0 / inf), kappa = 1 for two sides
that move equally, kappa <-> 1/kappa when the sides swap, the learning rates of Eq. 9, the measuring
period, the regulariser, the state, and a real LLaVA-style model (projector = feature side)."""

import copy
import math

import pytest
import torch
from torch import nn

import pareto_lora
from pareto_lora.training import balancers
from pareto_lora.training.schedulers import CoMMIT, coordinated_lrs, kl_drift

import models


def test_kl_drift_by_hand():
    p = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # uniform
    q = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # (3/4, 1/4)
    # KL = 1/2 log(1/2 / 3/4) + 1/2 log(1/2 / 1/4) = 1/2 log(4/3)
    assert kl_drift(p, q).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-14)
    assert kl_drift(p, p).item() == 0.0
    mask = torch.tensor([True, False])
    both = torch.stack([q[0], p[0]])
    assert kl_drift(torch.stack([p[0], p[0]]), both, mask).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-14)


def test_coordinated_lrs_eq9():
    assert coordinated_lrs(1e-3, 1e-3, 1.0) == (1e-3, 1e-3)
    lr_x, lr_s = coordinated_lrs(1.0, 1.0, 3.0)  # LLM leads -> its rate drops, the feature side's rises
    assert (lr_x, lr_s) == (0.5, 1.5)
    assert coordinated_lrs(1.0, 1.0, 1 / 3) == (1.5, 0.5)


class TwoSides(nn.Module):
    """logits = llm(x) + feature(x): two parameter groups acting on the same output."""

    def __init__(self, same: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.llm, self.feature = nn.Linear(6, 5, bias=False), nn.Linear(6, 5, bias=False)
        if same:
            self.feature.weight.data.copy_(self.llm.weight.data)
        else:
            self.feature.weight.data.mul_(3.0)

    def forward(self, x):
        return self.llm(x) + self.feature(x)


class Stacked(nn.Module):
    """logits = llm(tanh(feature(x))): a feature encoder under an LLM head (their updates differ)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.feature, self.llm = nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.llm(torch.tanh(self.feature(x)))


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 5, (16,), generator=gen)


def _step(model, sched, x, y, frozen=()):
    for p in frozen:
        p.requires_grad_(False)
    logits = model(x)
    nn.functional.cross_entropy(logits, y).backward()
    kappa = sched.step(forward=lambda: model(x), logits=logits)
    sched.optimizer.zero_grad()
    return kappa


def _sched(model, order=("llm", "feature"), lr=0.5, **kw):
    groups = [{"params": list(getattr(model, side).parameters())} for side in order]
    return CoMMIT(torch.optim.SGD(groups, lr=lr), llm_group=0, feature_group=1, **kw)


def test_equal_sides_give_kappa_one():
    model = TwoSides(same=True)
    x, y = _data()
    kappa = _step(model, _sched(model), x, y)
    assert kappa == pytest.approx(1.0, abs=1e-9)


def test_only_one_side_moves():
    x, y = _data()
    model = Stacked()
    assert _step(model, _sched(model), x, y, frozen=model.feature.parameters()) == math.inf
    model = Stacked()
    assert _step(model, _sched(model), x, y, frozen=model.llm.parameters()) == 0.0


def test_nearly_frozen_side_gives_kappa_far_from_one():
    x, y = _data()
    model = Stacked()
    opt = torch.optim.SGD([{"params": model.llm.parameters(), "lr": 0.5},
                           {"params": model.feature.parameters(), "lr": 1e-6}])
    assert _step(model, CoMMIT(opt), x, y) > 1e4
    model = Stacked()
    opt = torch.optim.SGD([{"params": model.llm.parameters(), "lr": 1e-6},
                           {"params": model.feature.parameters(), "lr": 0.5}])
    assert _step(model, CoMMIT(opt), x, y) < 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_swapping_the_sides_inverts_kappa(seed):
    x, y = _data(seed)
    a = Stacked(seed=seed)
    b = copy.deepcopy(a)
    k_ab = _step(a, _sched(a, ("llm", "feature")), x, y)
    k_ba = _step(b, _sched(b, ("feature", "llm")), x, y)
    assert k_ab != pytest.approx(1.0, rel=0.05)
    assert k_ab * k_ba == pytest.approx(1.0, rel=1e-9)
    assert torch.equal(a.llm.weight, b.llm.weight)  # the same update was measured both ways


def test_the_rates_follow_the_moving_average():
    x, y = _data()
    model = Stacked()
    sched = _sched(model, lr=0.1, window=3)
    kappas = [_step(model, sched, x, y) for _ in range(5)]
    want = sum(kappas[-3:]) / 3
    assert sched.kappa_avg == pytest.approx(want, rel=1e-12)
    lr_x, lr_s = (g["lr"] for g in sched.optimizer.param_groups)
    assert (lr_x, lr_s) == pytest.approx((0.2 / (want + 1), 0.2 / (1 / want + 1)), rel=1e-12)
    assert sched.get_last_lr() == [lr_x, lr_s]
    m = sched.metrics()
    assert m["commit/kappa"] == kappas[-1] and m["commit/lr_llm"] == lr_x and m["commit/overhead_s"] > 0


def test_clipped_kappa_and_measuring_period():
    x, y = _data()
    model = TwoSides(same=False)
    sched = _sched(model, every=3, kappa_max=10.0)
    calls = []

    def forward():
        calls.append(1)
        return model(x)

    measured = []
    for p in model.feature.parameters():
        p.requires_grad_(False)  # kappa = inf, clipped to 10 for the rates
    for _ in range(7):
        logits = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        measured.append(sched.step(forward=forward, logits=logits))
        sched.optimizer.zero_grad()
    assert [k is not None for k in measured] == [True, False, False, True, False, False, True]
    assert len(calls) == 2 * 3  # two extra forwards per measured step
    assert list(sched.history) == [10.0] * 3
    assert sched.lrs() == pytest.approx((2 * 0.5 / 11, 2 * 0.5 / 1.1))


def test_state_dict_round_trip():
    x, y = _data()
    model = TwoSides(same=False)
    sched = _sched(model)
    for _ in range(3):
        _step(model, sched, x, y)
    other = _sched(TwoSides(same=False))
    other.load_state_dict(sched.state_dict())
    assert other.kappa_avg == sched.kappa_avg and other.steps == 3
    assert [g["lr"] for g in other.optimizer.param_groups] == [g["lr"] for g in sched.optimizer.param_groups]


def test_regularization_rewards_drift():
    x, y = _data()
    model = TwoSides(same=False)
    sched = _sched(model, regularize=True, reg_weight=1.0)
    logits = model(x)
    assert sched.regularization(lambda: model(x), logits).item() == 0.0  # no previous step yet
    _step(model, sched, x, y)
    logits = model(x)
    reg = sched.regularization(lambda: model(x), logits)
    assert reg.item() < 0  # -KL(previous || current)
    (g,) = torch.autograd.grad(reg, model.llm.weight)
    assert g.abs().sum() > 0
    # a small step along -grad increases the drift from the previous parameters
    with torch.no_grad():
        model.llm.weight -= 1e-2 * g
    assert sched.regularization(lambda: model(x), model(x)).item() < reg.item()
    with pytest.raises(RuntimeError, match="regularize=True"):
        _sched(TwoSides(same=False)).regularization(lambda: model(x), logits)


@pytest.mark.parametrize("kw, field", [({"llm_group": 0, "feature_group": 0}, "feature_group"), ({"every": 0}, "every"),
                                       ({"window": 0}, "window"), ({"kappa_max": 1.0}, "kappa_max"),
                                       ({"feature_group": 5}, "feature_group")])
def test_bad_parameters(kw, field):
    model = TwoSides(same=False)
    opt = torch.optim.SGD([{"params": model.llm.parameters()}, {"params": model.feature.parameters()}], lr=0.1)
    with pytest.raises(ValueError, match=f"^{field}:"):
        CoMMIT(opt, **kw)


def test_llava_projector_against_language_lora():
    model = models.lora_llava()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    llm = [p for n, p in named if "multi_modal_projector" not in n]
    feat = [p for n, p in named if "multi_modal_projector" in n]
    assert llm and feat
    opt = torch.optim.AdamW([{"params": llm}, {"params": feat}], lr=1e-3)
    sched = CoMMIT(opt)
    pl = pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=3)
    batch = models.llava_batch()
    inputs = models.model_inputs(batch)
    for _ in range(2):
        out = model(**inputs)
        lt, li = pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])
        pl.backward(text=lt, image=li)
        kappa = sched.step(forward=lambda: model(**inputs).logits, logits=out.logits, mask=batch["labels"] != -100)
        opt.zero_grad()
        assert 0 < kappa < math.inf
    m = sched.metrics()
    assert m["commit/d_llm"] > 0 and m["commit/d_feature"] > 0
    assert m["commit/lr_llm"] == pytest.approx(2e-3 / (sched.kappa_avg + 1))


def test_commit_moved_to_schedulers_and_is_re_exported():
    assert balancers.CoMMIT is CoMMIT and balancers.kl_drift is kl_drift
    assert "CoMMIT" not in vars(balancers.base)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("side", [0, 1])  # which extra forward goes bad: LLM-only (0) or feature-only (1)
def test_nonfinite_logits_on_one_side_leave_the_average_alone(bad, side):
    x, y = _data()
    model = TwoSides(same=False)
    sched = _sched(model)
    _step(model, sched, x, y)
    history, lrs = list(sched.history), sched.lrs()
    logits = model(x)
    nn.functional.cross_entropy(logits, y).backward()
    calls = []

    def forward():
        out = model(x)
        calls.append(1)
        return out * bad if len(calls) == side + 1 else out

    kappa = sched.step(forward=forward, logits=logits)
    assert math.isnan(kappa) and math.isnan(sched.last["kappa"])  # before: kappa = inf with NaN on one side
    assert list(sched.history) == history and sched.lrs() == lrs


def test_kappa_of():
    from pareto_lora.training.schedulers.commit import kappa_of

    assert kappa_of(2.0, 4.0) == 0.5 and kappa_of(1.0, 0.0) == math.inf
    assert all(math.isnan(kappa_of(*d)) for d in ((0.0, 0.0), (math.nan, 1.0), (1.0, math.nan), (math.inf, 1.0)))


@pytest.mark.parametrize("edit", [
    lambda s: s.pop("history"), lambda s: s.update(history=[1.0, "2"]), lambda s: s.update(history=[math.nan]),
    lambda s: s.update(history=5), lambda s: s.update(steps=-1), lambda s: s.update(steps="3"),
    lambda s: s.update(last={"kappa": 1.0}), lambda s: s.update(base_lrs=[0.1]), lambda s: s.update(base_lrs=[0.1, -1]),
    lambda s: s.update(overhead_s=None),
])
def test_a_bad_state_is_refused_whole(edit):
    x, y = _data()
    model = TwoSides(same=False)
    sched = _sched(model)
    for _ in range(2):
        _step(model, sched, x, y)
    before = copy.deepcopy(sched.state_dict())
    assert len(before["history"]) == 2
    bad = copy.deepcopy(before)
    edit(bad)
    with pytest.raises(ValueError, match="^state: "):
        sched.load_state_dict(bad)
    now = sched.state_dict()
    assert now["history"] == before["history"] and now["steps"] == before["steps"]
    assert now["base_lrs"] == before["base_lrs"]

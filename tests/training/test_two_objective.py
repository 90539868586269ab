"""ParetoLoRA on real tiny transformers models, checked against plain autograd + the reference rule."""

import re

import numpy as np
import pytest
import torch

import pareto_lora
from pareto_lora import Case
from pareto_lora.training import ParetoLoRA

import models
from _oracle import oracle as oracle_grads


@pytest.fixture(scope="module")
def llama():
    return models.lora_llama(num_layers=5)


@pytest.fixture(scope="module")
def llava():
    return models.lora_llava()


def losses_of(model, batch, **kw):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"], **kw)


def plain_grads(model, batch):
    """name -> (g_text, g_image) with ordinary autograd, independent of ParetoLoRA."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lt, li = losses_of(model, batch)
    gt = torch.autograd.grad(lt, [p for _, p in named], retain_graph=True)
    gi = torch.autograd.grad(li, [p for _, p in named])
    return {n: (a, b) for (n, _), a, b in zip(named, gt, gi)}


def oracle_group(name: str, num_layers: int, num_groups: int) -> int:
    """Group index from the module path alone (the projector is group num_groups)."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    if m is None or "vision" in name:
        return num_groups
    split = np.array_split(np.arange(num_layers), num_groups)
    return next(g for g, layers in enumerate(split) if int(m.group(1)) in layers)


@pytest.mark.parametrize("rule", pareto_lora.RULES)
def test_integrated_grad_matches_reference_per_group_llama(llama, rule):
    batch = models.token_batch(seed=1)
    expected_grads = plain_grads(llama, batch)
    pl = ParetoLoRA(llama, rule=rule, tau=0.5, num_groups=3, modulate=[0, 2])
    report = pl.backward(*losses_of(llama, batch))
    groups = {n: oracle_group(n, 5, 3) for n in expected_grads}
    expected = oracle_grads(expected_grads, groups, {0, 2}, rule, 0.5)
    for name, p in llama.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), expected[name], rtol=2e-5, atol=1e-7, msg=name)
    assert report.cases[1] == Case.INACTIVE


@pytest.mark.parametrize("rule", ["pareto_lora", "mgda", "mmpareto"])
def test_integrated_grad_matches_reference_per_group_llava(llava, rule):
    batch = models.llava_batch(seed=2)
    expected_grads = plain_grads(llava, batch)
    pl = ParetoLoRA(llava, rule=rule, num_groups=3, modulate=["lower", "projector"])
    report = pl.backward(*losses_of(llava, batch))
    groups = {n: oracle_group(n, 3, 3) for n in expected_grads}
    assert sum(g == 3 for g in groups.values()) == 4  # the projector's LoRA A/B of two linears
    expected = oracle_grads(expected_grads, groups, {0, 3}, rule, 0.5)
    for name, p in llava.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), expected[name], rtol=2e-5, atol=1e-7, msg=name)
    assert report.groups["projector"]["case"] != Case.INACTIVE


def test_non_modulated_groups_get_exactly_the_sum(llama):
    batch = models.token_batch(seed=3)
    grads = plain_grads(llama, batch)
    pl = ParetoLoRA(llama, rule="mgda", num_groups=5, modulate="upper")
    pl.backward(*losses_of(llama, batch))
    for name, p in llama.named_parameters():
        if p.requires_grad and ".layers.4." not in name:
            assert torch.equal(p.grad, grads[name][0] + grads[name][1]), name


def test_grad_is_a_view_of_a_persistent_flat_buffer(llama):
    pl = ParetoLoRA(llama, num_groups=5)
    opt = torch.optim.SGD([p for p in llama.parameters() if p.requires_grad], lr=0.0)
    flat = pl.image.flats[0]
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for seed in range(2):
        pl.backward(*losses_of(llama, models.token_batch(seed=seed)))
        for p in pl.layout.params:
            assert lo <= p.grad.data_ptr() < hi
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert pl.image.flats[0].data_ptr() == lo


def test_accumulation_equals_one_concatenated_batch_and_runs_the_rule_once(llama, monkeypatch):
    micro = [models.token_batch(batch=2, seed=10 + i, image_span=(4 + 2 * i, 14)) for i in range(3)]
    whole = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    counts = [pareto_lora.modality_token_counts(m["labels"], image_token_mask=m["image_token_mask"]) for m in micro]
    num_items = (sum(c[0] for c in counts), sum(c[1] for c in counts))

    ref = ParetoLoRA(llama, rule="pareto_lora", num_groups=5, modulate="all")
    ref_report = ref.backward(*losses_of(llama, whole))
    expected = [p.grad.clone() for p in ref.layout.params]

    calls = []
    real = pareto_lora.flat.step.group_rule
    monkeypatch.setattr(pareto_lora.flat.step, "group_rule", lambda *a, **k: calls.append(1) or real(*a, **k))
    pl = ParetoLoRA(llama, rule="pareto_lora", num_groups=5, modulate="all")
    for m in micro:
        assert pl.backward(*losses_of(llama, m, num_items=num_items), step=False) is None
    assert calls == [] and pl.micro_batches == 3
    report = pl.integrate_accumulated()
    assert calls == [1] and report.micro_batches == 3 and pl.micro_batches == 0
    for p, e in zip(pl.layout.params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7)
    assert report.cases == ref_report.cases
    assert report.loss_text == pytest.approx(ref_report.loss_text, rel=1e-5)


def test_accumulate_alias_and_zero_grad_during_accumulation_is_an_error(llama):
    pl = ParetoLoRA(llama, num_groups=5)
    pl.accumulate(*losses_of(llama, models.token_batch(seed=0)))
    llama.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="reset or replaced during gradient accumulation"):
        pl.accumulate(*losses_of(llama, models.token_batch(seed=1)))


def test_text_only_batch_is_degenerate_not_nan(llama):
    batch = models.token_batch(seed=4, image_span=None)
    lt, li = losses_of(llama, batch)
    assert li.requires_grad and li.item() == 0.0
    grads = plain_grads(llama, batch)
    report = ParetoLoRA(llama, num_groups=5, modulate="all").backward(lt, li)
    assert set(report.cases) == {int(Case.DEGENERATE)}
    for name, p in llama.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all()
            torch.testing.assert_close(p.grad, grads[name][0], rtol=0, atol=0)


def test_report_layers_add_up_to_groups_and_as_dict(llama):
    report = ParetoLoRA(llama, num_groups=2, modulate="lower").backward(*losses_of(llama, models.token_batch()))
    layers, groups = report.layers, report.groups
    assert list(layers) == [f"layer{i}" for i in range(5)]
    for g, members in (("group0", range(3)), ("group1", range(3, 5))):
        total = sum(layers[f"layer{i}"]["norm_text"] ** 2 for i in members)
        assert total == pytest.approx(groups[g]["norm_text"] ** 2, rel=1e-5)
        assert groups[g]["ratio"] == pytest.approx(groups[g]["norm_text"] / groups[g]["norm_image"])
    flat = report.as_dict(layers=True)
    assert all(isinstance(v, float) for v in flat.values())
    for key in ("pareto/group0/ratio", "pareto/group1/case", "pareto/group0/alpha", "pareto/layer3/cosine",
                "pareto/loss_text", "pareto/loss_image"):
        assert key in flat
    assert flat["pareto/group1/case"] == float(Case.INACTIVE)
    assert "group0" in repr(report)


def _masked_chameleon_logits(model, batch):
    # transformers' Chameleon masks image-token logits to -inf: the image loss is infinite.
    logits = model(**models.model_inputs(batch)).logits
    img = torch.zeros(logits.shape[-1], dtype=torch.bool)
    img[models.IMAGE_RANGE[0] : models.IMAGE_RANGE[1]] = True
    logits = logits.masked_fill(img, float("-inf"))
    return pareto_lora.modality_losses(logits, batch["labels"], image_token_mask=batch["image_token_mask"])


def test_nonfinite_loss_raises_without_scaler(llama):
    pl = ParetoLoRA(llama, num_groups=5)
    lt, li = _masked_chameleon_logits(llama, models.token_batch())
    assert torch.isfinite(lt) and torch.isinf(li)
    with pytest.raises(FloatingPointError, match="image loss is not finite"):
        pl.backward(lt, li)
    # the failed step is discarded: the next one starts from scratch
    assert pl.micro_batches == 0
    assert pl.backward(*losses_of(llama, models.token_batch())).nonfinite is False


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


def test_nonfinite_loss_with_grad_scaler_skips_the_step(llama):
    pl = ParetoLoRA(llama, num_groups=5)
    opt, scaler = _sgd(llama), torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in pl.layout.params]
    report = pl.backward(*_masked_chameleon_logits(llama, models.token_batch()), scaler=scaler)
    assert report.nonfinite and set(report.cases) == {int(Case.NONFINITE)}
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 1024.0
    assert all(torch.equal(p, b) for p, b in zip(pl.layout.params, before))
    opt.zero_grad()


def test_nonfinite_gradient_reaches_the_scaler(llama):
    pl = ParetoLoRA(llama, num_groups=5, modulate="all")
    opt, scaler = _sgd(llama), torch.amp.GradScaler("cpu", init_scale=2.0**127)  # scaled gradients overflow
    before = [p.detach().clone() for p in pl.layout.params]
    report = pl.backward(*losses_of(llama, models.token_batch()), scaler=scaler)
    assert int(Case.NONFINITE) in report.cases
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(pl.layout.params, before))
    opt.zero_grad()


def test_bf16_autocast_with_grad_scaler_matches_unscaled(llama):
    batch = models.token_batch(seed=5)

    def step(scaler):
        pl = ParetoLoRA(llama, rule="pareto_lora", num_groups=5, modulate="all")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lt, li = losses_of(llama, batch)
        report = pl.backward(lt, li, scaler=scaler)
        if scaler is not None:
            scaler.unscale_(_sgd(llama))
        return [p.grad.clone() for p in pl.layout.params], report

    plain, r0 = step(None)
    scaled, r1 = step(torch.amp.GradScaler("cpu", init_scale=256.0))
    assert r0.cases == r1.cases and not r1.nonfinite
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_errors(llama):
    with pytest.raises(ValueError, match="rule: unknown rule"):
        ParetoLoRA(llama, rule="nope")
    with pytest.raises(ValueError, match="tau"):
        ParetoLoRA(llama, tau=0.0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        ParetoLoRA(llama, num_groups=5, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="num_groups"):
        ParetoLoRA(llama, num_groups=6)
    with pytest.raises(ValueError, match="modulate: unknown value"):
        ParetoLoRA(llama, num_groups=5, modulate="top")
    with pytest.raises(ValueError, match="model: no trainable LoRA parameters"):
        ParetoLoRA(models.tiny_llama(num_layers=2))

    pl = ParetoLoRA(llama, num_groups=5)
    lt, li = losses_of(llama, models.token_batch())
    with pytest.raises(ValueError, match="text: the loss does not require grad"):
        pl.backward(lt.detach(), li)
    with pytest.raises(ValueError, match="image: expected a scalar loss"):
        pl.backward(lt, torch.stack([li, li]))
    with pytest.raises(ValueError, match="image: expected a loss Tensor"):
        pl.backward(lt, 1.0)
    stray = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="text: the loss does not depend on any trainable LoRA parameter"):
        pl.backward(stray.sum(), li)
    with pytest.raises(ValueError, match="image: the loss does not depend on any trainable LoRA parameter"):
        pl.backward(lt, stray.sum())
    with pytest.raises(RuntimeError, match="integrate_accumulated: no gradients accumulated"):
        pl.integrate_accumulated()
    assert pl.micro_batches == 0  # nothing was written by the failed calls


def test_integrate_is_a_deprecated_alias_of_integrate_accumulated(llama):
    batch = models.token_batch(batch=2, seed=5)
    pl = ParetoLoRA(llama, rule="mgda", num_groups=2, modulate="all")
    pl.accumulate(*losses_of(llama, batch))
    with pytest.warns(DeprecationWarning, match="integrate_accumulated"):
        report = pl.integrate()
    assert report.micro_batches == 1 and pl.micro_batches == 0


def test_rule_parameters_come_from_one_spec(llama):
    spec = pareto_lora.RuleSpec("mmpareto", tau=0.3, gamma=1.5)
    pl = ParetoLoRA(llama, rule=spec, num_groups=2)
    assert pl.spec is spec and (pl.rule, pl.tau, pl.gamma, pl.symmetric) == ("mmpareto", 0.3, 1.5, False)
    with pytest.raises(ValueError, match="^tau: expected None when rule is a RuleSpec"):
        ParetoLoRA(llama, rule=spec, tau=0.5)
    with pytest.raises(ValueError, match="^tau: expected a finite number > 0"):
        ParetoLoRA(llama, rule="pareto_lora", tau=-1.0)

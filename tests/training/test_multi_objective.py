"""ParetoLoRA(objectives=...): the K-objective step on a tiny PEFT LoRA Llama, checked against a direct
per-group computation (torch.autograd.grad of each loss, the float64 Gram, the weighting) and, for K = 2,
against the two-objective ParetoLoRA."""

import math

import pytest
import torch
import torch.nn.functional as F

from pareto_lora import Case, MultiObjectiveLoRA, ParetoLoRA, RuleSpec
from pareto_lora.flat import group_of_names
from pareto_lora.multi import gram_matrix, upper_triangle
from pareto_lora.multi import weightings

import models

NAMES = ("prompt", "answer", "image")


@pytest.fixture(scope="module")
def llama():
    return models.lora_llama(num_layers=4)


def three_losses(model, batch, scale: float = 1.0):
    """prompt (text targets before the image), answer (text after it), image: token means in float32."""
    logits = model(**models.model_inputs(batch)).logits[:, :-1].float()
    labels, image = batch["labels"][:, 1:], batch["image_token_mask"][:, 1:]
    early = torch.arange(labels.shape[1]) < 6

    def ce(m):
        return scale * F.cross_entropy(logits[m], labels[m])

    return {"prompt": ce(~image & early), "answer": ce(~image & ~early), "image": ce(image)}


def make(model, rule="mean", objectives=NAMES, modulate=("lower", "upper"), **kw):
    return ParetoLoRA(model, rule=rule, num_groups=2, modulate=modulate, objectives=objectives, backend="reference", **kw)


def direct(model, losses, pl, spec):
    """name -> expected .grad: per group, the float64 Gram of the autograd gradients -> the weighting -> the sum."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    per_loss = [torch.autograd.grad(losses[k], params, retain_graph=True) for k in pl.objectives]
    group = group_of_names(pl.layout)
    expected, grams = {}, {}
    for gi, g in enumerate(pl.layout.group_names):
        idx = [i for i, n in enumerate(names) if group[n] == g]
        flats = [torch.cat([per_loss[k][i].double().reshape(-1) for i in idx]) for k in range(len(pl.objectives))]
        gram = torch.stack([torch.stack([a @ b for b in flats]) for a in flats])
        w, _ = weightings.apply(spec, gram[None], pl.layout.active[gi : gi + 1], torch.float64)
        grams[g] = upper_triangle(gram)
        for i in idx:
            expected[names[i]] = sum(w[0, k] * per_loss[k][i].double() for k in range(len(flats)))
    return expected, grams


@pytest.mark.parametrize("rule", [RuleSpec("mean"), RuleSpec("constant", weights=(0.25, 1.0, 3.0)), RuleSpec("sum")])
def test_three_objectives_equal_the_direct_per_group_computation(llama, rule):
    batch = models.token_batch(seed=1)
    pl = make(llama, rule=rule)
    assert isinstance(pl, MultiObjectiveLoRA) and pl.objectives == NAMES
    losses = three_losses(llama, batch)
    expected, grams = direct(llama, losses, pl, rule)
    report = pl.backward(**three_losses(llama, batch))
    for n, p in llama.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), expected[n], rtol=1e-6, atol=1e-9, msg=n)
    active = pl.layout.active.tolist()
    for gi, (g, row) in enumerate(report.groups.items()):
        torch.testing.assert_close(report.group_stats[gi], grams[g], rtol=1e-9, atol=0)
        want = [1.0] * 3 if not active[gi] else {"mean": [1 / 3] * 3, "sum": [1.0] * 3}.get(rule.name, list(rule.weights))
        assert list(row["weights"].values()) == pytest.approx(want)
        assert row["case"] == (int(Case.INACTIVE) if not active[gi] else
                               int(Case.SUMMED if rule.name == "sum" else Case.WEIGHTED))
        g64 = gram_matrix(grams[g], 3)
        norms = g64.diagonal().sqrt()
        assert list(row["norm"].values()) == pytest.approx(norms.tolist(), rel=1e-9)
        assert row["cosine"]["prompt"]["image"] == pytest.approx((g64[0, 2] / (norms[0] * norms[2])).item(), rel=1e-9)
    assert report.losses == pytest.approx({k: v.item() for k, v in losses.items()})
    flat = report.as_dict()
    assert "pareto/group0/cos_answer_image" in flat and "pareto/group0/w_prompt" in flat
    assert "pareto/loss_answer" in flat and "pareto/layer0/norm_image" in report.as_dict(layers=True)


@pytest.mark.parametrize("rule", [RuleSpec("mean"), RuleSpec("constant", weights=(0.3, 2.0))])
def test_two_named_objectives_equal_the_two_objective_paretolora(llama, rule):
    batch = models.token_batch(seed=2)
    two = ParetoLoRA(llama, rule=rule, num_groups=2, modulate="all")
    assert type(two) is ParetoLoRA
    losses = three_losses(llama, batch)
    r2 = two.backward(text=losses["answer"], image=losses["image"])
    want = [p.grad.clone() for p in two.layout.params]
    many = make(llama, rule=rule, objectives=("answer", "image"), modulate="all")
    losses = three_losses(llama, batch)
    rk = many.backward(answer=losses["answer"], image=losses["image"])
    for p, w in zip(many.layout.params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-9)
    assert rk.cases == r2.cases
    for g, row in rk.groups.items():
        assert list(row["weights"].values()) == pytest.approx([r2.groups[g]["alpha"], r2.groups[g]["beta"]])
        assert row["cosine"]["answer"]["image"] == pytest.approx(r2.groups[g]["cosine"], rel=1e-6)


def test_text_image_objectives_are_the_two_objective_step(llama):
    pl = ParetoLoRA(llama, num_groups=2, objectives=("text", "image"))
    assert type(pl) is ParetoLoRA and pl.rule == "pareto_lora"


def test_losses_dict_equals_keywords_and_accumulation_equals_one_batch(llama):
    b1, b2 = models.token_batch(seed=3), models.token_batch(seed=4)
    pl = make(llama, rule=RuleSpec("constant", weights=(1.0, 0.5, 2.0)))
    pl.backward(losses=three_losses(llama, b1), step=False)
    pl.accumulate(**three_losses(llama, b2))
    assert pl.micro_batches == 2
    report = pl.integrate_accumulated()
    got = [p.grad.clone() for p in pl.layout.params]
    joint = {k: a + b for (k, a), b in zip(three_losses(llama, b1).items(), three_losses(llama, b2).values())}
    one = make(llama, rule=RuleSpec("constant", weights=(1.0, 0.5, 2.0)))
    one_report = one.backward(losses=joint)
    for p, g in zip(one.layout.params, got):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)
    assert report.micro_batches == 2 and report.losses == pytest.approx(one_report.losses)


def _snapshot(pl):
    return [p.grad.clone() for p in pl.layout.params], pl.state_dict()


def _same(pl, snap):
    grads, state = snap
    assert all(torch.equal(p.grad, g) for p, g in zip(pl.layout.params, grads))
    now = pl.state_dict()
    assert now["micro_batches"] == state["micro_batches"] and torch.equal(now["losses"], state["losses"])
    assert all(torch.equal(a, b) for x, y in zip(now["grads"], state["grads"]) for a, b in zip(x, y))


def test_bad_calls_change_nothing(llama):
    pl = make(llama)
    pl.backward(**three_losses(llama, models.token_batch(seed=5)), step=False)
    snap = _snapshot(pl)
    good = three_losses(llama, models.token_batch(seed=6))
    other = models.lora_llama(num_layers=4, seed=9)
    foreign = three_losses(other, models.token_batch(seed=6))["image"]
    bad = [
        ({"losses": {"prompt": good["prompt"], "answer": good["answer"]}}, r"losses: expected one loss per objective .*missing \['image'\]"),
        ({**good, "extra": good["image"]}, r"losses: .*unknown \['extra'\]"),
        ({"losses": good, "prompt": good["prompt"]}, "losses: expected either"),
        ({"losses": [good["prompt"]]}, "losses: expected a dict"),
        ({**good, "answer": good["answer"].detach()}, "answer: the loss does not require grad"),
        ({**good, "image": torch.stack([good["image"]] * 2)}, "image: expected a scalar loss"),
        ({**good, "prompt": 1.0}, "prompt: expected a loss Tensor"),
        ({**good, "image": foreign}, "image: the loss does not depend on any trainable LoRA parameter"),
        ({**good, "step": "yes"}, "step"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            pl.backward(**kwargs)
        _same(pl, snap)
    llama.zero_grad(set_to_none=True)  # between accumulate() calls: refused, the window is intact
    with pytest.raises(RuntimeError, match="reset or replaced during gradient accumulation"):
        pl.backward(**three_losses(llama, models.token_batch(seed=6)))
    pl.grads[-1].attach_as_grad(pl.layout.params)
    _same(pl, snap)


def test_constructor_arguments_are_checked_by_name(llama):
    cases = [
        (dict(objectives=("a",)), "objectives: expected 2 to 8 names, got 1"),
        (dict(objectives=tuple("abcdefghi")), "objectives: expected 2 to 8 names, got 9"),
        (dict(objectives=("a", "a")), "objectives: expected distinct names"),
        (dict(objectives=("a", "step")), "objectives: expected names that are Python identifiers"),
        (dict(objectives=("a", "not a name")), "objectives: expected names"),
        (dict(objectives="ab"), "objectives: expected a tuple"),
        (dict(objectives=NAMES, rule="pareto_lora"), "rule: 'pareto_lora' has no K-objective form"),
        (dict(objectives=NAMES, rule="constant", weights=(1.0, 2.0)), "weights: expected 3 weights"),
        (dict(objectives=NAMES, balancer="mimo"), "balancer: not supported with K objectives"),
        (dict(objectives=NAMES, stats_ema=1.0), "stats_ema: expected"),
        (dict(objectives=NAMES, preserve_norm="yes"), "preserve_norm: expected"),
        (dict(objectives=NAMES, traversal="sum_first"), "traversal: 'sum_first' is not supported"),
        (dict(objectives=NAMES, traversal="vmap"), "traversal: expected one of auto, two_pass, batched, got"),
        (dict(objectives=NAMES, on_nonfinite="never"), "on_nonfinite"),
        (dict(objectives=NAMES, backend="gpu"), "backend: unknown backend"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            ParetoLoRA(llama, num_groups=2, **{"backend": "reference", **kw})
    assert ParetoLoRA(llama, num_groups=2, objectives=NAMES).backend == "auto"  # the compiled kernels on the CPU
    pl = make(llama)
    with pytest.raises(ValueError, match="weights: expected 3 weights"):
        pl.spec = RuleSpec("constant", weights=(1.0, 2.0))
    with pytest.raises(RuntimeError, match="no gradients accumulated"):
        pl.integrate_accumulated()


def test_state_dict_resumes_mid_accumulation(llama):
    b1, b2 = models.token_batch(seed=7), models.token_batch(seed=8)
    rule = RuleSpec("constant", weights=(2.0, 1.0, 0.5))
    pl = make(llama, rule=rule)
    pl.accumulate(**three_losses(llama, b1))
    state = pl.state_dict()
    pl.accumulate(**three_losses(llama, b2))
    pl.integrate_accumulated()
    want = [p.grad.clone() for p in pl.layout.params]
    resumed = make(llama)  # another rule: the checkpoint's comes back
    resumed.load_state_dict(state)
    assert resumed.spec == rule and resumed.micro_batches == 1
    resumed.accumulate(**three_losses(llama, b2))
    resumed.integrate_accumulated()
    assert all(torch.equal(p.grad, w) for p, w in zip(resumed.layout.params, want))
    bad = [
        ({**state, "objectives": ["a", "b", "c"]}, "state: objectives: expected"),
        ({**state, "losses": torch.zeros(2, dtype=torch.float64)}, r"state: losses: expected a Tensor of shape \[3\]"),
        ({**state, "grads": state["grads"][:2]}, "state: grads: the checkpoint's gradient buffers do not match"),
        ({**state, "rule": {"name": "pareto_lora"}}, "state: rule: 'pareto_lora' has no K-objective form"),
        ({k: v for k, v in state.items() if k != "scaled"}, "state: missing key"),
        ({**state, "micro_batches": -1}, "state: micro_batches"),
    ]
    fresh = make(llama)
    for s, match in bad:
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(s)
        assert fresh.micro_batches == 0 and fresh.spec == RuleSpec("mean")


def test_grad_scaler_scales_every_loss_alike_and_a_nonfinite_loss_skips_the_step(llama):
    batch = models.token_batch(seed=9)
    plain = make(llama)
    plain.backward(**three_losses(llama, batch))
    want = [p.grad.clone() for p in plain.layout.params]
    scaled = make(llama)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    report = scaled.backward(**three_losses(llama, batch), scaler=scaler)
    assert report.losses == pytest.approx(plain.last_report.losses)  # unscaled losses in the report
    for p, w in zip(scaled.layout.params, want):
        torch.testing.assert_close(p.grad, 64.0 * w, rtol=1e-6, atol=1e-9)
    # a non-finite loss: raise without a scaler, NaN gradients (skipped step) with one
    pl = make(llama)
    losses = three_losses(llama, batch)
    losses["answer"] = losses["answer"] * math.inf
    with pytest.raises(FloatingPointError, match="answer loss is not finite"):
        pl.backward(**losses)
    assert pl.micro_batches == 0
    opt = torch.optim.SGD(pl.layout.params, lr=0.1)
    before = [p.detach().clone() for p in pl.layout.params]
    losses = three_losses(llama, batch)
    losses["answer"] = losses["answer"] * math.inf
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    report = pl.backward(**losses, scaler=scaler)
    assert report.nonfinite and set(report.cases) == {int(Case.NONFINITE)}
    assert all(torch.isnan(p.grad).all() for p in pl.layout.params)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 4.0
    assert all(torch.equal(p, b) for p, b in zip(pl.layout.params, before))
    opt.zero_grad()


def test_groups_that_span_two_dtypes_get_one_gram(llama):
    # Two buckets (bfloat16, float32): each group's Gram is the sum over both, so both buckets' launches
    # apply the same weights; with "constant" the result is still the direct per-group computation.
    model = models.lora_llama(num_layers=4, seed=3)
    for name, module in model.named_modules():
        if name.endswith(("layers.0.self_attn.q_proj.lora_A.default", "layers.3.mlp.up_proj.lora_B.default")):
            module.to(torch.bfloat16)
    rule = RuleSpec("constant", weights=(0.5, 1.5, 1.0))
    pl = make(model, rule=rule)
    assert [b.dtype for b in pl.layout.buckets] == [torch.bfloat16, torch.float32]
    batch = models.token_batch(seed=11)

    def losses():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # casts every linear's operands: mixed weights work
            return three_losses(model, batch)

    expected, grams = direct(model, losses(), pl, rule)
    report = pl.backward(**losses())
    for n, p in model.named_parameters():
        if p.requires_grad:  # the bfloat16 ones: one rounding of the float64 sum
            torch.testing.assert_close(p.grad, expected[n].to(p.dtype), msg=n)
    for gi, g in enumerate(pl.layout.group_names):
        torch.testing.assert_close(report.group_stats[gi], grams[g], rtol=1e-6, atol=0)


def test_a_user_weighting_is_the_rule_and_a_checkpoint_asks_for_it_again(llama):
    """rule= a callable on the batched Gram: the step applies its weights; its checkpoint carries a marker,
    not the code, and a ParetoLoRA with a named rule refuses to resume from it."""
    batch = models.token_batch(seed=2)

    def inverse_norms(gram):
        return 1.0 / torch.diagonal(gram, dim1=-2, dim2=-1).sqrt()

    pl = make(llama, rule=inverse_norms)
    assert pl.rule == "user" and pl.spec is inverse_norms
    losses = three_losses(llama, batch)
    expected, _ = direct(llama, losses, pl, inverse_norms)
    pl.backward(**three_losses(llama, batch))
    for n, p in llama.named_parameters():
        if p.requires_grad:  # weights near 4 stored in float32: the sum's rounding is relative to its largest term
            torch.testing.assert_close(p.grad.double(), expected[n], rtol=1e-6, atol=1e-6 * float(expected[n].abs().max()),
                                       msg=n)
    state = pl.state_dict()
    assert state["rule"] == {"user": True}
    make(llama, rule=inverse_norms).load_state_dict(state)
    with pytest.raises(ValueError, match=r"^state: rule: the checkpoint was saved with a user-defined weighting"):
        make(llama, rule="mean").load_state_dict(state)
    with pytest.raises(ValueError, match=r"^tau: expected no rule parameters with a user-defined weighting"):
        make(llama, rule=inverse_norms, tau=0.3)
    llama.zero_grad(set_to_none=True)


def test_buffers_that_cannot_fit_are_refused_before_allocation(llama, monkeypatch):
    """K flat buffers larger than the device's free memory: ValueError naming objectives and the sizes."""
    import pareto_lora.flat.buffers as buffers

    monkeypatch.setattr(buffers, "free_memory", lambda device: 1024)
    with pytest.raises(ValueError, match=r"^objectives: 3 flat gradient buffers of the trainable parameters need "
                                         r"[0-9.]+ GiB on cpu, and 0\.00 GiB is free"):
        make(llama)
    monkeypatch.setattr(buffers, "free_memory", lambda device: None)  # not knowable: nothing is checked
    make(llama)
    assert buffers.buffer_bytes(make(llama).layout) == 4 * sum(p.numel() for p in llama.parameters() if p.requires_grad)

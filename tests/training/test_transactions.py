"""Issue 11.8-9: misuse of the training API leaves every .grad and all state as it was; a
checkpoint taken mid-accumulation resumes exactly."""

import pytest
import torch

import pareto_lora
from pareto_lora.training import ParetoLoRA

import models


def losses_of(model, batch):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


def batch(seed):
    return models.token_batch(batch=2, seed=seed, image_span=(4, 14))


def grads(pl):
    return [None if p.grad is None else p.grad.clone() for p in pl.layout.params]


def state(pl):
    return (pl.micro_batches, pl._losses.clone(), [f.clone() for f in pl.text.flats], [f.clone() for f in pl.image.flats])


def assert_same(before, after):
    for x, y in zip(before, after):
        if isinstance(x, list):
            assert all(torch.equal(u, v) for u, v in zip(x, y))
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


@pytest.fixture
def llama():
    return models.lora_llama(num_layers=3)


def test_a_backward_that_fails_part_way_changes_nothing(llama):
    pl = ParetoLoRA(llama, num_groups=3, modulate="all")
    pl.accumulate(*losses_of(llama, batch(0)))
    g0, s0 = grads(pl), state(pl)
    text, _ = losses_of(llama, batch(1))
    _, image = losses_of(llama, batch(2))
    torch.autograd.grad(image, [p for p in llama.parameters() if p.requires_grad], allow_unused=True)  # frees it
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        pl.accumulate(text, image)
    assert all(torch.equal(a, b) for a, b in zip(g0, grads(pl)))
    assert_same(s0, state(pl))
    report = pl.integrate_accumulated()  # the failed micro-batch left no trace in the report either
    lt, li = losses_of(llama, batch(0))
    assert report.micro_batches == 1 and report.loss_text == pytest.approx(float(lt), rel=1e-6)


def test_the_first_backward_of_a_step_failing_keeps_the_last_steps_grads(llama):
    pl = ParetoLoRA(llama, num_groups=3)
    pl.backward(*losses_of(llama, batch(0)))
    g0 = grads(pl)
    text, _ = losses_of(llama, batch(1))
    _, image = losses_of(llama, batch(2))
    torch.autograd.grad(image, [p for p in llama.parameters() if p.requires_grad], allow_unused=True)  # frees it
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        pl.backward(text, image)
    assert all(torch.equal(a, b) for a, b in zip(g0, grads(pl))) and pl.micro_batches == 0


def test_zero_grad_during_accumulation_raises_and_the_step_still_lands_in_grad(llama):
    ref = ParetoLoRA(llama, num_groups=3, modulate="all")
    ref.accumulate(*losses_of(llama, batch(0)))
    ref.integrate_accumulated()
    want = grads(ref)

    pl = ParetoLoRA(llama, num_groups=3, modulate="all")
    pl.accumulate(*losses_of(llama, batch(0)))
    llama.zero_grad(set_to_none=True)
    s0 = state(pl)
    with pytest.raises(RuntimeError, match="reset or replaced during gradient accumulation"):
        pl.accumulate(*losses_of(llama, batch(1)))
    assert_same(s0, state(pl))  # the error changed nothing
    pl.integrate_accumulated()  # the micro-batch before the error lands in .grad, not in a void
    for p, w in zip(pl.layout.params, want):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_a_changed_set_of_trainable_parameters_is_refused_before_anything_changes(llama, change):
    pl = ParetoLoRA(llama, num_groups=3)
    pl.accumulate(*losses_of(llama, batch(0)))
    s0, g0 = state(pl), grads(pl)
    if change == "unfreeze":
        weight = next(p for n, p in llama.named_parameters() if n.endswith("embed_tokens.weight"))
        weight.requires_grad_(True)
        match = r"^model: the trainable parameters changed .*newly trainable: .*embed_tokens"
    else:
        weight = pl.layout.params[0]
        weight.requires_grad_(False)
        match = rf"^model: the trainable parameters changed .*newly frozen: {pl.layout.names[0]}"
    try:
        with pytest.raises(ValueError, match=match):
            pl.accumulate(*losses_of(llama, batch(1)))
    finally:
        weight.requires_grad_(change != "unfreeze")
    assert_same(s0, state(pl))
    assert all(torch.equal(a, b) for a, b in zip(g0, grads(pl)))


def test_a_mid_accumulation_checkpoint_resumes_exactly(llama, tmp_path):
    ref = ParetoLoRA(llama, rule="mmpareto", num_groups=3, modulate="all", gamma=1.5)
    for s in range(3):
        ref.accumulate(*losses_of(llama, batch(s)))
    ref_report = ref.integrate_accumulated()
    want = grads(ref)

    pl = ParetoLoRA(llama, rule="mmpareto", num_groups=3, modulate="all", gamma=1.5)
    for s in range(2):
        pl.accumulate(*losses_of(llama, batch(s)))
    torch.save(pl.state_dict(), tmp_path / "pl.pt")
    llama.zero_grad(set_to_none=True)

    fresh = ParetoLoRA(llama, num_groups=3, modulate="all")  # rule comes from the checkpoint
    fresh.load_state_dict(torch.load(tmp_path / "pl.pt", weights_only=True))
    assert fresh.spec == pl.spec and fresh.micro_batches == 2
    fresh.accumulate(*losses_of(llama, batch(2)))
    report = fresh.integrate_accumulated()
    assert report.micro_batches == 3 and report.cases == ref_report.cases
    assert report.loss_image == pytest.approx(ref_report.loss_image, rel=1e-12)
    for p, w in zip(fresh.layout.params, want):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=0)


def test_a_checkpoint_of_another_layout_is_refused_before_anything_changes(llama):
    pl = ParetoLoRA(llama, num_groups=3)
    pl.accumulate(*losses_of(llama, batch(0)))
    sd = pl.state_dict()
    other = ParetoLoRA(models.lora_llama(num_layers=2), num_groups=2)
    s0 = state(other)
    with pytest.raises(ValueError, match="^state: the checkpoint's gradient buffers do not match"):
        other.load_state_dict(sd)
    assert_same(s0, state(other))
    with pytest.raises(ValueError, match="^state: expected a ParetoLoRA.state_dict"):
        other.load_state_dict({"rule": {}})


# ---- issue 27 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_moved_to_another_dtype_is_refused_before_anything_changes(dtype):
    model = models.lora_llama(num_layers=3)
    pl = ParetoLoRA(model, num_groups=3)
    pl.accumulate(*losses_of(model, batch(0)))
    s0 = state(pl)
    model.to(dtype)  # converts .grad too: that is the user's change; the buffers must stay as they were
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"^model: the trainable parameters changed .*dtype changed: .* float32 -> {name}"):
        pl.accumulate(*losses_of(model, batch(1)))
    with pytest.raises(ValueError, match=r"^model: .*build a new ParetoLoRA"):
        pl.integrate_accumulated()  # .grad could no longer view the float32 buffers
    assert_same(s0, state(pl))


def test_a_replaced_lora_parameter_is_refused_before_anything_changes(llama):
    pl = ParetoLoRA(llama, num_groups=3)
    pl.accumulate(*losses_of(llama, batch(0)))
    s0, g0 = state(pl), grads(pl)
    name = next(n for n in pl.layout.names if "lora_A" in n)
    owner_name, attr = name.rsplit(".", 1)
    owner = llama.get_submodule(owner_name)
    setattr(owner, attr, torch.nn.Parameter(getattr(owner, attr).detach().clone()))
    with pytest.raises(ValueError, match=rf"^model: the trainable parameters changed .*replaced by a new Parameter: {name}"):
        pl.accumulate(*losses_of(llama, batch(1)))
    assert_same(s0, state(pl))
    assert all(torch.equal(a, b) for a, b in zip(g0, grads(pl)))


def test_a_frozen_weight_swapped_for_another_frozen_one_is_not_a_change(llama):
    pl = ParetoLoRA(llama, num_groups=3)
    owner = llama.get_submodule("base_model.model.lm_head")
    owner.weight = torch.nn.Parameter(owner.weight.detach().clone(), requires_grad=False)
    pl.backward(*losses_of(llama, batch(0)))  # no error: no gradient depends on that object


@pytest.mark.parametrize("when", ["mid_window", "first_of_a_later_step"])
def test_an_image_loss_of_another_model_is_refused_before_anything_changes(llama, when):
    """Issue 27: the graph walk ran once per ParetoLoRA; later such a loss raised 'Tensor list must
    have at least one tensor' after the text buffer had changed."""
    other = models.lora_llama(num_layers=3, seed=1)
    pl = ParetoLoRA(llama, num_groups=3)
    pl.accumulate(*losses_of(llama, batch(0)))
    if when == "first_of_a_later_step":
        pl.integrate_accumulated()
    s0, g0 = state(pl), grads(pl)
    text, _ = losses_of(llama, batch(1))
    _, image = losses_of(other, batch(1))
    with pytest.raises(ValueError, match=r"^image: the loss does not depend on any trainable LoRA parameter"):
        pl.accumulate(text, image)
    assert_same(s0, state(pl))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, grads(pl)))
    with pytest.raises(ValueError, match=r"^text: the loss does not depend"):
        pl.accumulate(losses_of(other, batch(2))[0], losses_of(llama, batch(2))[1])
    assert_same(s0, state(pl))


def _bad_states(sd):
    def edit(**kw):
        d = dict(sd)
        for k, v in kw.items():
            if v is KeyError:
                d.pop(k, None)
            else:
                d[k] = v
        return d

    return {
        "losses_shape": (edit(losses=torch.zeros(3, dtype=torch.float64)), r"^state: losses: expected .*shape \[2\]"),
        "losses_scalar": (edit(losses=torch.zeros((), dtype=torch.float64)), r"^state: losses: expected"),
        "losses_list": (edit(losses=[0.0, 0.0]), r"^state: losses: expected"),
        "nonfinite_dtype": (edit(nonfinite=torch.zeros(2)), r"^state: nonfinite: expected a bool"),
        "missing_losses": (edit(losses=KeyError), r"^state: missing key\(s\) 'losses'"),
        "missing_rule": (edit(rule=KeyError), r"^state: missing key\(s\) 'rule'"),
        "micro_str": (edit(micro_batches="two"), r"^state: micro_batches: expected an int >= 0"),
        "micro_neg": (edit(micro_batches=-1), r"^state: micro_batches: expected an int >= 0"),
        "micro_bool": (edit(micro_batches=True), r"^state: micro_batches: expected an int >= 0"),
        "scaled_str": (edit(scaled="False"), r"^state: scaled: expected a bool"),
        "rule_tau": (edit(rule=dict(sd["rule"], tau=-1.0)), r"^state: rule: tau: expected"),
        "rule_key": (edit(rule=dict(sd["rule"], colour="red")), r"^state: rule: "),
        "rule_type": (edit(rule="pareto_lora"), r"^state: rule: expected a dict"),
        "text_type": (edit(text=None), r"^state: text: expected a list"),
        "text_shape": (edit(text=[torch.zeros(3)] * len(sd["text"])), r"^state: the checkpoint's gradient buffers"),
        "options_type": (edit(options=[1]), r"^state: options: expected a dict"),
        "balancer_name": (edit(balancer={"name": "mimo", "state": {}}), r"^state: the checkpoint was saved with balancer"),
        "version": (edit(version=2), r"^state: expected a ParetoLoRA.state_dict"),
        "not_a_dict": ([sd], r"^state: expected a ParetoLoRA.state_dict"),
    }


@pytest.mark.parametrize("case", list(_bad_states({"rule": {}, "text": []})))
def test_a_bad_checkpoint_is_refused_whole_and_changes_nothing(llama, case):
    pl = ParetoLoRA(llama, rule="mmpareto", num_groups=3, gamma=1.5)
    pl.accumulate(*losses_of(llama, batch(0)))
    sd = pl.state_dict()
    pl2 = ParetoLoRA(llama, num_groups=3)  # another window in progress, another rule
    pl2.accumulate(*losses_of(llama, batch(1)))
    s0, g0, spec0 = state(pl2), grads(pl2), pl2.spec
    bad, match = _bad_states(sd)[case]
    with pytest.raises(ValueError, match=match):
        pl2.load_state_dict(bad)
    assert_same(s0, state(pl2))
    assert pl2.spec == spec0 and pl2._bad.tolist() == [False, False] and pl2._scaled is False
    assert all(torch.equal(a, b) for a, b in zip(g0, grads(pl2)))
    pl2.load_state_dict(sd)  # the good one still loads
    assert pl2.micro_batches == 1 and pl2.spec == pl.spec


def test_the_default_num_groups_fits_a_model_of_fewer_than_five_layers():
    """Issue 27: ParetoLoRA(model) failed on any model of fewer than 5 layers."""
    for layers, want in ((2, 2), (3, 3), (6, 5)):
        pl = ParetoLoRA(models.lora_llama(num_layers=layers))
        assert sum(1 for g in pl.layout.group_names if g.startswith("group")) == want, layers

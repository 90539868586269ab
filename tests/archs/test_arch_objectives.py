"""objective_losses_for: a mixed batch's text, understanding and generation losses (issue 29).

Each architecture gets a batch with all three kinds: a pure-text stretch, text after an image
input, and generated image tokens. The split is checked against masks written here by position,
against the two-objective losses (token-weighted sums) and against cross-entropy by hand.
"""

import pytest
import torch
import torch.nn.functional as F

import arch_models as am
import pareto_lora
from pareto_lora import archs
from pareto_lora.flat import group_of_names

K_ARCHS = ("chameleon", "emu3", "janus")


def mixed_chameleon():
    """Row 0 generates its image (labels = ids); row 1 is shown the same kind of image (labels -100 there)."""
    batch = am.chameleon_batch(seed=7)
    batch["labels"][1, 4:12] = -100
    under = torch.zeros_like(batch["labels"], dtype=torch.bool)
    under[1, 12:14] = True  # row 1's text after the image, up to its padded tail (14:)
    return batch, under


def mixed_emu3():
    batch = am.emu3_batch(seed=7)
    batch["labels"][1, 3:17] = -100
    under = torch.zeros_like(batch["labels"], dtype=torch.bool)
    under[1, 17:] = True
    return batch, under


def mixed_janus():
    """Row 0: 16 <image> placeholders (an understanding input), then the text-to-image sample; row 1: without them."""
    base = am.janus_batch(seed=7)
    n = 16  # (image_size 20 / patch_size 5) ** 2
    pad = torch.randint(2, am.JANUS_BOI, (2, n), generator=torch.Generator().manual_seed(3))
    pad[0] = am.JANUS_IMAGE_TOKEN
    ids = torch.cat([pad, base["input_ids"]], 1)
    codes = torch.cat([torch.full((2, n), -100), base["image_codes"]], 1)
    labels = ids.clone()
    batch = {"input_ids": ids, "labels": labels, "image_codes": codes, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))}
    under = torch.zeros_like(ids, dtype=torch.bool)
    under[0, n:] = codes[0, n:] == -100  # every text target after the placeholders (the placeholders are inputs only)
    return batch, under


MIXED = {"chameleon": mixed_chameleon, "emu3": mixed_emu3, "janus": mixed_janus}


def _two_objective_masks(model, batch, spec):
    labels = batch["labels"]
    image = archs.image_token_mask(model, batch, spec)
    valid = (labels != -100) & (labels != spec.placeholder_token_id)
    return valid & ~image, image


@pytest.mark.parametrize("name", K_ARCHS)
def test_masks_are_disjoint_complete_and_split_by_image_inputs(lora_model, name):
    model = lora_model(name)
    spec = archs.detect_arch(model)
    batch, under = MIXED[name]()
    masks = archs.objective_masks(model, batch, spec)
    assert tuple(masks) == archs.OBJECTIVES
    text2, image2 = _two_objective_masks(model, batch, spec)
    assert torch.equal(masks["understanding"], under)
    assert torch.equal(masks["generation"], image2)
    assert torch.equal(masks["text"], text2 & ~under)
    total = sum(m.long() for m in masks.values())
    assert total.max() == 1 and torch.equal(total.bool(), text2 | image2)  # disjoint, and the union is all targets
    assert all(m.any() for m in masks.values())  # the batch really has all three kinds


@pytest.mark.parametrize("name", K_ARCHS)
def test_losses_sum_token_weighted_to_the_two_objective_losses(lora_model, name):
    model = lora_model(name)
    spec = archs.detect_arch(model)
    batch, _ = MIXED[name]()
    losses = archs.objective_losses_for(model, batch, spec)
    counts = archs.objective_token_counts_for(model, batch, spec)
    text2, image2 = archs.modality_losses_for(model, batch, spec)
    n_text2, n_image2 = archs.modality_token_counts_for(model, batch, spec)
    assert all(v.dtype == torch.float32 and v.dim() == 0 and v.requires_grad for v in losses.values())
    assert counts["text"] + counts["understanding"] == n_text2 and counts["generation"] == n_image2
    torch.testing.assert_close(counts["text"] * losses["text"] + counts["understanding"] * losses["understanding"],
                               n_text2 * text2)
    torch.testing.assert_close(losses["generation"], image2, rtol=0, atol=0)


def test_chameleon_understanding_loss_is_the_cross_entropy_after_the_shown_image(lora_model):
    model = lora_model("chameleon")
    batch, under = mixed_chameleon()
    losses = archs.objective_losses_for(model, batch)
    base = model.get_base_model()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = base.lm_head(base.model(**inputs).last_hidden_state)  # unmasked, by hand
    m = under[:, 1:]
    expected = F.cross_entropy(logits[:, :-1][m].float(), batch["labels"][:, 1:][m])
    torch.testing.assert_close(losses["understanding"], expected)


def test_janus_heads_and_the_image_input(lora_model):
    model = lora_model("janus")
    batch, _ = mixed_janus()
    losses = archs.objective_losses_for(model, batch)
    head = [p for n, p in model.named_parameters() if ".generation_head." in n and "lora_" in n]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(losses["generation"], head, retain_graph=True))
    for name in ("text", "understanding"):  # lm_head scores them: the generation head gets nothing
        assert all(g is None for g in torch.autograd.grad(losses[name], head, allow_unused=True, retain_graph=True))
    moved = dict(batch, pixel_values=batch["pixel_values"] * 2)
    again = archs.objective_losses_for(model, moved)
    assert not torch.equal(again["understanding"], losses["understanding"])  # the image input is read


@pytest.mark.parametrize("name", K_ARCHS)
def test_absent_objectives_are_zero_and_differentiable(lora_model, name):
    model = lora_model(name)
    losses = archs.objective_losses_for(model, am.BATCHES[name](with_image=False))
    assert losses["text"].item() > 0
    params = [p for p in model.parameters() if p.requires_grad]
    for kind in ("understanding", "generation"):
        assert losses[kind].item() == 0.0 and losses[kind].requires_grad
        grads = torch.autograd.grad(losses[kind], params, allow_unused=True, retain_graph=True)
        assert all(g is None or not g.any() for g in grads)


def test_num_items_divides_each_sum(lora_model):
    model = lora_model("emu3")
    batch, _ = mixed_emu3()
    counts = archs.objective_token_counts_for(model, batch)
    losses = archs.objective_losses_for(model, batch)
    scaled = archs.objective_losses_for(model, batch, num_items={k: 2 * v for k, v in counts.items()})
    for k in archs.OBJECTIVES:
        torch.testing.assert_close(scaled[k], losses[k] / 2)


def test_bad_batches_and_arguments_are_refused_by_name(lora_model):
    model = lora_model("chameleon")
    batch, _ = mixed_chameleon()
    with pytest.raises(ValueError, match="num_items: expected a dict with the keys text, understanding, generation"):
        archs.objective_losses_for(model, batch, num_items={"text": 3})
    with pytest.raises(ValueError, match="num_items"):
        archs.objective_losses_for(model, batch, num_items=(3, 4))
    with pytest.raises(ValueError, match="batch: expected input_ids"):
        archs.objective_losses_for(model, {"labels": batch["labels"]})
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 16\)"):
        archs.objective_losses_for(model, dict(batch, labels=batch["labels"][:, :8]))
    with pytest.raises(ValueError, match="image_token_mask: expected shape"):
        archs.objective_losses_for(model, dict(batch, image_token_mask=torch.ones(2, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="model: llava generates only text"):
        archs.objective_losses_for(lora_model("llava"), am.llava_batch())
    with pytest.raises(ValueError, match="batch: expected labels"):
        archs.objective_masks(model, {"input_ids": batch["input_ids"][0]})


def test_a_three_objective_janus_lora_step_runs_end_to_end(lora_model):
    # issue 29: ParetoLoRA(arch="auto", objectives=OBJECTIVES) on a mixed Janus batch; .grad is the
    # constant-weighted sum of the three autograd gradients in every modulated group, the plain sum elsewhere.
    model = lora_model("janus")
    batch, _ = mixed_janus()
    weights = (0.5, 2.0, 1.5)
    pl = pareto_lora.ParetoLoRA(model, rule="constant", weights=weights, arch="auto", num_groups=2,
                                modulate=("lower", "generation"), objectives=archs.OBJECTIVES, backend="reference")
    assert pl.layout.group_names == ("group0", "group1", "generation", "projector")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    losses = archs.objective_losses_for(model, batch, pl.arch)
    per_loss = [torch.autograd.grad(losses[k], [p for _, p in named], retain_graph=True, allow_unused=True)
                for k in archs.OBJECTIVES]
    report = pl.backward(**archs.objective_losses_for(model, batch, pl.arch))
    group = group_of_names(pl.layout)
    for i, (n, p) in enumerate(named):
        w = weights if group[n] in ("group0", "generation") else (1.0, 1.0, 1.0)
        want = sum(wk * (g[i] if g[i] is not None else torch.zeros_like(p)).double() for wk, g in zip(w, per_loss))
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=1e-9, msg=n)
    rows = report.groups
    # "text" targets see no image input, so the image-input side (projector) gets nothing from them
    assert rows["projector"]["norm"]["text"] == 0 and rows["projector"]["norm"]["understanding"] > 0
    assert all(v > 0 for g, row in rows.items() for k, v in row["norm"].items() if (g, k) != ("projector", "text"))
    assert rows["group0"]["weights"] == pytest.approx(dict(zip(archs.OBJECTIVES, weights)))
    assert rows["group0"]["case"] == pareto_lora.Case.WEIGHTED and rows["group1"]["case"] == pareto_lora.Case.INACTIVE


def janus_mixed_example(i: int) -> dict:
    """One Janus example with all three kinds: prompt text, 16 <image> placeholders (+ pixel_values),
    the answer, then <begin_of_image> and 3 + i generated VQ codes; the last i labels ignored."""
    gen = torch.Generator().manual_seed(200 + i)
    ids = torch.randint(2, am.JANUS_BOI, (32,), generator=gen)
    ids[4:20] = am.JANUS_IMAGE_TOKEN
    codes = torch.full_like(ids, -100)
    ids[23] = am.JANUS_BOI
    n = 3 + i  # target counts differ between examples: a window is not the mean of its micro-batches' means
    codes[24 : 24 + n] = torch.randint(0, am.JANUS_CODES, (n,), generator=gen)
    ids[24 : 24 + n] = 0
    labels = ids.clone()
    labels[32 - i :] = -100
    return {"input_ids": ids, "labels": labels, "image_codes": codes, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(3, 20, 20, generator=gen)}


class JanusMixed(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return janus_mixed_example(i)


def _trainer_args(tmp_path, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                logging_steps=1, report_to=[], use_cpu=True, learning_rate=0.0, save_strategy="no", disable_tqdm=True,
                lr_scheduler_type="constant", max_grad_norm=0.0)
    return transformers.TrainingArguments(**{**base, **kw})


def test_trainer_window_of_three_objectives_equals_one_large_batch(tmp_path):
    # GA = 2 micro-batches of 2: the window's per-objective token counts make it the 4 examples at once.
    transformers = pytest.importorskip("transformers")
    model = am.lora(am.tiny_janus())
    grads = []

    class Snap(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    weights = dict(rule="constant", pareto_kwargs={"weights": (1.0, 0.5, 2.0), "backend": "reference"})
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=_trainer_args(tmp_path), train_dataset=JanusMixed(),
                                            arch="auto", num_groups=2, modulate="all", objectives=archs.OBJECTIVES,
                                            **weights, callbacks=[Snap()])
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert {"pareto/loss_understanding", "pareto/group0/cos_text_generation", "pareto/generation/w_generation"} <= set(log)
    whole = {k: torch.stack([janus_mixed_example(i)[k] for i in range(4)]) for k in janus_mixed_example(0)}
    pl = pareto_lora.ParetoLoRA(model, arch="auto", num_groups=2, modulate="all", objectives=archs.OBJECTIVES,
                                rule="constant", weights=(1.0, 0.5, 2.0), backend="reference")
    report = pl.backward(**archs.objective_losses_for(model, whole, pl.arch))
    assert all(v > 0 for v in report.losses.values())
    names = dict(zip(pl.layout.params, pl.layout.names))
    for p in pl.layout.params:
        torch.testing.assert_close(grads[0][names[p]], p.grad, rtol=1e-4, atol=1e-7)


def test_trainer_takes_a_function_returning_the_k_losses(tmp_path):
    model = am.lora(am.tiny_janus())
    calls = []

    def losses_fn(m, inputs):
        calls.append(inputs["input_ids"].shape)
        losses = archs.objective_losses_for(m, inputs)
        return {"words": losses["text"] + losses["understanding"], "pixels": losses["generation"]}

    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=_trainer_args(tmp_path, max_steps=2, learning_rate=1e-2),
                                            train_dataset=JanusMixed(), arch="auto", num_groups=2, modulate="all",
                                            objectives=("words", "pixels"), losses_fn=losses_fn,
                                            pareto_kwargs={"backend": "reference"})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert len(calls) == 4 and trainer.pareto_report.rule == "mean"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["pareto/group0/w_words"] == pytest.approx(0.5) for h in logs)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="losses_fn: expected a function"):
        pareto_lora.ParetoLoRATrainer(model=model, args=_trainer_args(tmp_path), train_dataset=JanusMixed(),
                                      arch="auto", objectives=("words", "pixels"), pareto_kwargs={"backend": "reference"})
    with pytest.raises(ValueError, match="losses_fn: expected objectives"):
        pareto_lora.ParetoLoRATrainer(model=model, args=_trainer_args(tmp_path), train_dataset=JanusMixed(),
                                      arch="auto", losses_fn=losses_fn)


def test_trainer_checkpoint_carries_the_k_objective_state(tmp_path):
    model = am.lora(am.tiny_janus())
    kw = dict(arch="auto", num_groups=2, objectives=archs.OBJECTIVES, rule="constant",
              pareto_kwargs={"weights": (1.0, 0.5, 2.0), "backend": "reference"})
    args = _trainer_args(tmp_path, save_strategy="steps", save_steps=1)
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=args, train_dataset=JanusMixed(), **kw)
    trainer.train()
    ckpt = tmp_path / "checkpoint-1"
    state = torch.load(ckpt / trainer.STATE_FILE, weights_only=True)
    assert state["objectives"] == list(archs.OBJECTIVES) and state["rule"]["weights"] == (1.0, 0.5, 2.0)
    other = pareto_lora.ParetoLoRATrainer(model=model, args=args, train_dataset=JanusMixed(),
                                          **{**kw, "pareto_kwargs": {"backend": "reference"}, "rule": "mean"})
    other.create_optimizer_and_scheduler(num_training_steps=1)
    other._load_optimizer_and_scheduler(str(ckpt))
    assert other.pareto.spec == trainer.pareto.spec  # the checkpoint's rule came back
    swapped = dict(kw, objectives=("generation", "understanding", "text"))
    wrong = pareto_lora.ParetoLoRATrainer(model=model, args=args, train_dataset=JanusMixed(), **swapped)
    wrong.create_optimizer_and_scheduler(num_training_steps=1)
    with pytest.raises(ValueError, match="state: objectives: expected"):
        wrong._load_optimizer_and_scheduler(str(ckpt))

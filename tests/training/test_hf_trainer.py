"""ParetoLoRATrainer: a few real Trainer steps on CPU, logged diagnostics, accumulation, errors."""

import math
import warnings

import pytest
import torch

import pareto_lora

import models

transformers = pytest.importorskip("transformers")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=12, with_mask=True):
        self.n, self.with_mask = n, with_mask

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = {k: v[0] for k, v in models.token_batch(batch=1, seed=i, image_span=(4 + i % 5, 16)).items()}
        if not self.with_mask:
            del item["image_token_mask"]
        return item


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=3, logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-2,
                save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant", max_grad_norm=0.0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trains_three_steps_and_logs_per_group_diagnostics(tmp_path):
    model = models.lora_llama(num_layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rec = pareto_lora.diagnostics.Recorder(tmp_path / "diag.jsonl")
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path), train_dataset=TokenDataset(),
                                            num_groups=2, modulate="lower", recorder=rec, log_layers=True)
    trainer.train()
    rec.close()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    for h in logs:
        for g in ("group0", "group1"):
            for k in ("norm_text", "norm_image", "cosine", "ratio", "alpha", "beta", "case"):
                assert math.isfinite(h[f"pareto/{g}/{k}"])
        assert h["pareto/group1/case"] == float(pareto_lora.Case.INACTIVE)
        assert "pareto/layer3/ratio" in h
        # losses of a window are normalised by the window's token counts: their sum is the logged loss
        assert h["loss"] == pytest.approx(h["pareto/loss_text"] + h["pareto/loss_image"], rel=1e-4)
    assert [r["micro_batches"] for r in pareto_lora.diagnostics.load(tmp_path / "diag.jsonl")] == [2, 2, 2]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_accumulated_window_equals_one_large_batch(tmp_path):
    """Two micro-batches of 2 (GA=2) give the same .grad as ParetoLoRA on the 4 examples at once."""
    model = models.lora_llama(num_layers=4)
    ds = TokenDataset(n=4)
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path, max_steps=1, learning_rate=0.0),
                                            train_dataset=ds, num_groups=2, modulate="all")
    grads = {}
    trainer.add_callback(_GradSnapshot(model, grads))
    trainer.train()

    whole = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    pl = pareto_lora.ParetoLoRA(model, num_groups=2, modulate="all")
    out = model(**models.model_inputs(whole))
    pl.backward(*pareto_lora.modality_losses(out.logits, whole["labels"], image_token_mask=whole["image_token_mask"]))
    names = dict(zip(pl.layout.params, pl.layout.names))
    assert len(grads) == len(names)
    for p in pl.layout.params:
        torch.testing.assert_close(grads[names[p]], p.grad, rtol=1e-4, atol=1e-7)


class _GradSnapshot(transformers.TrainerCallback):
    def __init__(self, model, store):
        self.model, self.store = model, store

    def on_pre_optimizer_step(self, args, state, control, **kw):
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                self.store[n] = p.grad.detach().clone()


def test_errors(tmp_path):
    model = models.lora_llama(num_layers=2)
    with pytest.raises(ValueError, match="modulate: unknown value"):
        pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path), train_dataset=TokenDataset(),
                                      num_groups=2, modulate="top")
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path, max_steps=1),
                                            train_dataset=TokenDataset(with_mask=False), num_groups=2)
    with pytest.raises(ValueError, match="no 'image_token_mask' and no image_token_range"):
        trainer.train()


def test_every_rule_keyword_reaches_pareto_lora(tmp_path):
    # tau directly, the other RuleSpec fields (margin too) through pareto_kwargs; kept when rebuilt at train().
    model = models.lora_llama(num_layers=2)
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                                            num_groups=2, tau=0.3, pareto_kwargs=dict(gamma=1.5, symmetric=True, margin=0.2))
    spec = pareto_lora.RuleSpec("pareto_lora", tau=0.3, gamma=1.5, symmetric=True, margin=0.2)
    assert trainer.pareto.spec == spec
    trainer.train()
    assert trainer.pareto.spec == spec and trainer.pareto.margin == 0.2


def test_image_token_range_instead_of_a_mask(tmp_path):
    model = models.lora_llama(num_layers=2)
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path, max_steps=1),
                                            train_dataset=TokenDataset(with_mask=False), num_groups=2,
                                            image_token_range=models.IMAGE_RANGE)
    trainer.train()
    assert "pareto/group0/ratio" in trainer.state.log_history[0]


@pytest.mark.parametrize("rule", ["mimo", "gradnorm"])
def test_balancers_by_name_with_commit_rates(tmp_path, rule):
    from pareto_lora.training.balancers import CoMMIT

    model = models.lora_llama(num_layers=4)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    upper = [p for n, p in named if not any(f".layers.{i}." in n for i in (0, 1))]
    lower = [p for n, p in named if any(f".layers.{i}." in n for i in (0, 1))]  # the "feature" side here
    opt = torch.optim.AdamW([{"params": upper}, {"params": lower}], lr=1e-2)
    seen, step = [], opt.step

    def recording_step(*a, **kw):  # the rates in force while the optimizer steps
        seen.append([g["lr"] for g in opt.param_groups])
        return step(*a, **kw)

    opt.step = recording_step
    commit = CoMMIT(every=2)
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path, max_steps=4), train_dataset=TokenDataset(),
                                            optimizers=(opt, None), rule=rule, num_groups=2, modulate="all",
                                            commit=commit)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    key = {"mimo": "pareto/mimo/sigma_text", "gradnorm": "pareto/gradnorm/w_text"}[rule]
    assert all(math.isfinite(h[key]) for h in logs)
    assert commit.steps == 4 and len(commit.history) == 2  # measured at steps 0 and 2
    assert all(0 < k < math.inf for k in commit.history)
    assert logs[-1]["pareto/commit/kappa_avg"] == pytest.approx(commit.kappa_avg)
    # the Trainer's own (constant) schedule is restored after each step; during a step CoMMIT's rates hold
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2]
    assert len(seen) == 4 and seen[0] == [1e-2, 1e-2]
    k = commit.history[0]  # measured at step 0, in force from step 1
    assert seen[1] == pytest.approx([2e-2 / (k + 1), 2e-2 / (1 / k + 1)])


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """Like the plain Trainer: 4 steps in one go == 2 steps, checkpoint, resume for 2 more."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, seed=7, data_seed=7)
    torch.manual_seed(0)
    straight = models.lora_llama(num_layers=4)
    init = {n: p.detach().clone() for n, p in straight.state_dict().items()}
    t1 = pareto_lora.ParetoLoRATrainer(model=straight, args=make_args(tmp_path / "a", **kw), train_dataset=TokenDataset(),
                                       rule="mmpareto", num_groups=2, modulate="all")
    t1.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / pareto_lora.ParetoLoRATrainer.STATE_FILE).is_file()

    resumed = models.lora_llama(num_layers=4)
    resumed.load_state_dict(init)
    t2 = pareto_lora.ParetoLoRATrainer(model=resumed, args=make_args(tmp_path / "b", **kw), train_dataset=TokenDataset(),
                                       rule="sum", num_groups=2, modulate="all")  # the checkpoint's rule wins
    t2.train(resume_from_checkpoint=str(ckpt))
    assert t2.pareto.rule == "mmpareto"
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


def test_commit_state_travels_with_the_checkpoint(tmp_path):
    from pareto_lora.training.balancers import CoMMIT

    def trainer(model, out, commit):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        lower = [p for n, p in named if ".layers.0." in n]
        opt = torch.optim.AdamW([{"params": [p for n, p in named if ".layers.0." not in n]}, {"params": lower}], lr=1e-2)
        args = make_args(out, max_steps=4, save_strategy="steps", save_steps=2, seed=7, data_seed=7)
        return pareto_lora.ParetoLoRATrainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=(opt, None),
                                             rule="mimo", num_groups=2, commit=commit)

    first = CoMMIT()
    trainer(models.lora_llama(num_layers=4), tmp_path / "a", first).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / pareto_lora.ParetoLoRATrainer.COMMIT_FILE).is_file()
    saved = torch.load(ckpt / pareto_lora.ParetoLoRATrainer.COMMIT_FILE, weights_only=True)
    assert saved["steps"] == 2 and len(saved["history"]) == 2
    state = torch.load(ckpt / pareto_lora.ParetoLoRATrainer.STATE_FILE, weights_only=True)
    assert state["balancer"]["name"] == "mimo"
    resumed = CoMMIT()
    trainer(models.lora_llama(num_layers=4), tmp_path / "b", resumed).train(resume_from_checkpoint=str(ckpt))
    assert resumed.steps == 4 and len(resumed.history) == 4
    assert list(resumed.history)[:2] == saved["history"]


class NoLabels(TokenDataset):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        del item["labels"]
        return item


def test_batches_without_labels_are_a_value_error_naming_labels(tmp_path):
    """Issue 27: the Trainer raised KeyError: 'labels' from inside its batch counting."""
    model = models.lora_llama(num_layers=2)
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=NoLabels(4),
                                            num_groups=2)
    with pytest.raises(ValueError, match=r"^labels: expected a 'labels' entry in every batch"):
        trainer.train()


@pytest.mark.parametrize("objectives", [None, ("text", "image_part")])
def test_the_trainer_checks_the_optimizer_with_two_and_with_k_objectives(tmp_path, objectives):
    # SGD with a rule that can lengthen the gradient (pcgrad: at any K) warns once, on either path.
    model = models.lora_llama(num_layers=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def losses_fn(m, inputs):
        text, image = pareto_lora.modality_losses(m(input_ids=inputs["input_ids"]).logits, inputs["labels"],
                                                  image_token_mask=inputs["image_token_mask"])
        return {"text": text, "image_part": image}

    kw = {} if objectives is None else {"objectives": objectives, "losses_fn": losses_fn}
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                                            optimizers=(opt, None), rule="pcgrad", num_groups=2, **kw)
    with pytest.warns(UserWarning, match="rule 'pcgrad' can lengthen the gradient and SGD"):
        trainer.train()
    # The Trainer's default AdamW (inside accelerate's AcceleratedOptimizer): judged as AdamW, no warning.
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                                            rule="pcgrad", num_groups=2, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*can lengthen the gradient")
        trainer.train()

"""ParetoLoRATrainer(arch="auto") on real unified multimodal architectures: a few CPU steps each.

With an arch the Trainer's losses come from ``modality_losses_for`` (the batches carry no
``image_token_mask``: the labels-and-mask path would refuse them), the groups from the spec.
"""

import math

import pytest
import torch

import arch_models as am
import pareto_lora
from pareto_lora import archs

transformers = pytest.importorskip("transformers")


class ArchDataset(torch.utils.data.Dataset):
    """Single examples cut from the architecture's test batches (arch_models.example)."""

    def __init__(self, name: str, n: int = 8):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return am.example(self.name, i)


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=2, logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-2,
                save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant", max_grad_norm=0.0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class GradSnapshot(transformers.TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("name, modulate, named", [("chameleon", "lower", ()), ("janus", ["lower", "generation"], ("generation", "projector"))])
def test_trainer_steps_and_logs_the_arch_groups(tmp_path, name, modulate, named):
    model = am.lora(am.MODELS[name]())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path), train_dataset=ArchDataset(name),
                                            arch="auto", num_groups=2, modulate=modulate)
    assert trainer.arch == archs.detect_arch(model) and trainer.pareto.layout.group_names == ("group0", "group1", *named)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h in logs:
        for g in ("group0", "group1", *named):
            # Janus' understanding side (projector) gets no gradient: these batches have no pixel_values
            assert math.isfinite(h[f"pareto/{g}/norm_image"]) and (h[f"pareto/{g}/norm_image"] > 0) == (g != "projector")
        assert h["pareto/group1/case"] == float(pareto_lora.Case.INACTIVE)
        assert h["loss"] == pytest.approx(h["pareto/loss_text"] + h["pareto/loss_image"], rel=1e-4)
    if "generation" in named:
        assert all(h["pareto/generation/case"] != float(pareto_lora.Case.INACTIVE) for h in logs)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["chameleon", "janus"])
def test_trainer_window_equals_the_three_lines_on_one_large_batch(tmp_path, name):
    """GA=2 micro-batches of 2 give the .grad of ParetoLoRA(arch="auto") on the 4 examples at once."""
    model = am.lora(am.MODELS[name]())
    ds = ArchDataset(name, n=4)
    args = make_args(tmp_path, max_steps=1, learning_rate=0.0)
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=args, train_dataset=ds, arch="auto", num_groups=2,
                                            modulate="all")
    snap = GradSnapshot(model)
    trainer.add_callback(snap)
    trainer.train()

    whole = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    pl = pareto_lora.ParetoLoRA(model, arch="auto", num_groups=2, modulate="all")
    pl.backward(*pareto_lora.archs.modality_losses_for(model, whole))
    names = dict(zip(pl.layout.params, pl.layout.names))
    assert len(snap.grads[0]) == len(names)
    for p in pl.layout.params:
        torch.testing.assert_close(snap.grads[0][names[p]], p.grad, rtol=1e-4, atol=1e-7)


def test_trainer_with_arch_refuses_emu3_all_linear(tmp_path):
    model = am.lora(am.tiny_emu3())
    with pytest.raises(ValueError, match="exclude_modules"):
        pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path), train_dataset=ArchDataset("emu3"),
                                      arch="auto", num_groups=2)


def test_trainer_arch_given_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pareto_kwargs: expected none of"):
        pareto_lora.ParetoLoRATrainer(model=am.lora(am.tiny_chameleon()), args=make_args(tmp_path),
                                      train_dataset=ArchDataset("chameleon"), arch="auto", pareto_kwargs={"arch": None})


class LlavaDataset(torch.utils.data.Dataset):
    """Examples that each carry their image (the test batch's sample 0 and its pixel_values)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        batch = am.llava_batch(seed=100 + i)
        return {k: v[0] for k, v in batch.items()}


@pytest.mark.parametrize("name", ["emu3", "llava"])
def test_trainer_steps_on_emu3_and_llava(tmp_path, name):
    """Every supported architecture trains through the Trainer: Emu3 with its frozen VQ tokenizer
    left out of LoRA (the fix its refusal names), LLaVA with the projector + vision tower group."""
    model = am.MODELS[name]()
    spec = archs.detect_arch(model)
    model = am.lora(model, exclude_modules=spec.lora_exclude_modules)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dataset = ArchDataset(name) if name != "llava" else LlavaDataset()
    trainer = pareto_lora.ParetoLoRATrainer(model=model, args=make_args(tmp_path), train_dataset=dataset,
                                            arch="auto", num_groups=2, modulate="all")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h in logs:
        assert math.isfinite(h["pareto/loss_text"]) and math.isfinite(h["pareto/loss_image"])
        assert h["pareto/loss_image"] > 0 and math.isfinite(h["pareto/group0/ratio"])
        assert h["loss"] == pytest.approx(h["pareto/loss_text"] + h["pareto/loss_image"], rel=1e-4)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

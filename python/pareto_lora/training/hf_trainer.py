"""ParetoLoRATrainer: transformers.Trainer with the two-objective Pareto LoRA step.

    trainer = pareto_lora.ParetoLoRATrainer(
        model=peft_model, args=TrainingArguments(..., gradient_accumulation_steps=4, bf16=True),
        train_dataset=ds,                       # items carry input_ids, labels, image_token_mask
        rule="pareto_lora", tau=0.5, num_groups=5, modulate="lower")
    trainer.train()

Each micro-batch: one forward, text and image cross-entropy (:func:`modality_losses` from the
batch's ``labels`` and ``image_token_mask``; with ``arch=`` :func:`pareto_lora.archs.modality_losses_for`,
the forward each unified multimodal architecture needs), both
backpropagated into their own buffers (:class:`ParetoLoRA`); on the micro-batch that ends an
accumulation window (``accelerator.sync_gradients``) the rule runs once, and the Trainer's own
clipping / optimizer step / scheduler follow unchanged. Both losses of a window are normalised
by the window's total text and image target counts (computed in ``get_batch_samples``), so k
micro-batches equal one batch of k times the size. With ``fp16`` the accelerator's GradScaler
scales both objectives, and a non-finite loss or gradient makes it skip the step; ``bf16``
autocast needs no scaler. Every training log (``logging_steps``) gets the last step's
``report.as_dict()`` (``pareto/group0/ratio``, ...) so TensorBoard/W&B show them.

Several processes (``torchrun`` / ``accelerate launch``): the Trainer wraps the model in DDP
itself, inside ``train()`` (``accelerator.prepare``), after this trainer was built. The
ParetoLoRA built in ``__init__`` (on the bare model, so that configuration errors surface at
once) is therefore rebuilt once on that wrapper at the first ``training_step``, the first point
where the wrapper exists and nothing has been accumulated yet; its communication hook is then
the one DDP runs. The Trainer's ``no_sync`` on all but the last micro-batch of a window is what
ParetoLoRA's DDP accumulation expects. The window's token counts are summed over the ranks and
each rank's losses are multiplied by the world size, so DDP's average of the ranks' gradients
is the gradient of the global-batch token means. DataParallel (n_gpu > 1), DeepSpeed and FSDP
through the Trainer are refused.

K objectives (``objectives=("text", "understanding", "generation")``, a K-objective ``rule`` such
as "mean"): the trainer builds a :class:`~pareto_lora.training.multi_objective.MultiObjectiveLoRA`
and accumulates every micro-batch's K losses. They come from ``losses_fn(model, inputs) -> {name:
loss}`` (each micro-batch's losses divided by the accumulation steps), or, with ``arch`` and
``objectives=pareto_lora.archs.OBJECTIVES``, from :func:`pareto_lora.archs.objective_losses_for`
normalised by the window's per-objective target counts. Under DDP as for two objectives: the
window's counts are summed over the ranks and each rank's losses multiplied by the world size, so
DDP's average is the gradient of the global window's per-objective token means.
"""

from __future__ import annotations

import os

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

from ..archs import OBJECTIVES, modality_losses_for, modality_token_counts_for, objective_losses_for
from ..archs import objective_token_counts_for
from .losses import modality_losses, modality_token_counts
from .report import StepReport
from .two_objective import ParetoLoRA

__all__ = ["ParetoLoRATrainer"]


class ParetoLoRATrainer(Trainer):
    """transformers.Trainer whose training step integrates a text and an image objective.

    Extra keyword arguments (all optional):
        rule, tau, num_groups, modulate, arch: as in :class:`pareto_lora.ParetoLoRA`. With an
            ``arch`` ("auto" or an ArchSpec) the losses come from
            :func:`pareto_lora.archs.modality_losses_for` (batches as it documents: ``labels``
            optional, Janus ``image_codes``, optional ``image_token_mask``); without one each
            batch needs ``labels`` and ``image_token_mask`` (or ``image_token_range``).
            ``rule`` may also be a balancer: "mimo", "gradnorm" or an object from
            :mod:`pareto_lora.training.balancers`.
        pareto_kwargs: further ParetoLoRA keyword arguments (gamma, symmetric, margin, layers_path, ...).
        image_token_key: batch key of the bool image-token mask aligned with ``labels``
            (default "image_token_mask"); it is removed before the model's forward.
        image_token_range: ``(first_id, end_id)`` of discrete image tokens, instead of a mask.
        log_layers: also log per-layer numbers (``pareto/layer{i}/...``).
        recorder: a :class:`pareto_lora.diagnostics.Recorder` that gets every step's report
            (one host sync per step).
        commit: a :class:`pareto_lora.training.schedulers.CoMMIT` (coordinated learning rates of
            two optimizer parameter groups; pass the optimizer with ``optimizers=(opt, None)``).
            kappa is measured on each window's last micro-batch; its numbers are logged as
            ``pareto/commit/...``.
        objectives, losses_fn: K objectives and the function returning their losses (module docstring).
    """

    def __init__(
        self,
        *args,
        rule: str | None = None,
        tau: float | None = None,
        num_groups: int | str | None = None,
        modulate="lower",
        arch=None,
        pareto_kwargs: dict | None = None,
        image_token_key: str = "image_token_mask",
        image_token_range: tuple[int, int] | None = None,
        log_layers: bool = False,
        recorder=None,
        commit=None,
        objectives=None,
        losses_fn=None,
        **kwargs,
    ):
        if pareto_kwargs and {"rule", "tau", "num_groups", "modulate", "arch", "objectives"} & pareto_kwargs.keys():
            raise ValueError("pareto_kwargs: expected none of rule, tau, num_groups, modulate, arch, objectives "
                             "(pass them directly)")
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError("args: ParetoLoRATrainer does not support torch.nn.DataParallel (n_gpu > 1); use one device")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("args: expected one process or DDP; ParetoLoRATrainer does not support DeepSpeed or FSDP yet")
        self.image_token_key = image_token_key
        self.image_token_range = image_token_range
        self.log_layers = log_layers
        self.recorder = recorder
        # Built now so that configuration errors surface before training starts; rebuilt on the
        # DDP wrapper at the first training_step when there is one (_bind).
        if rule is None and objectives is None:
            rule = "pareto_lora"  # the two-objective default; K objectives default to "mean"
        self._pareto_kwargs = dict(rule=rule, tau=tau, num_groups=num_groups, modulate=modulate, arch=arch,
                                   **(pareto_kwargs or {}), **({} if objectives is None else {"objectives": objectives}))
        self.pareto = ParetoLoRA(self.model, **self._pareto_kwargs)
        self._pareto_kwargs["arch"] = self.arch = self.pareto.arch  # detect once; None: labels + mask
        self.objectives = getattr(self.pareto, "objectives", None)  # None: the two-objective step
        self.losses_fn = self._check_losses_fn(losses_fn, commit)
        self._objective_counts: dict | None = None
        self._pareto_bound_to = self.model
        self.pareto_report: StepReport | None = None
        self.commit = commit
        self._commit_batch: tuple | None = None
        if commit is not None:
            if self.arch is not None:
                raise ValueError("commit: CoMMIT in the Trainer needs the labels + image_token_mask batches (arch=None) for now")
            from .schedulers.hf_commit import CoMMITCallback

            self.add_callback(CoMMITCallback(commit, self._commit_forward, lambda: self._commit_batch[1],
                                             lambda: self._commit_batch[2]))
        self._modality_counts: tuple[torch.Tensor, torch.Tensor] | None = None

    def _check_losses_fn(self, losses_fn, commit):
        if losses_fn is not None and not callable(losses_fn):
            raise ValueError(f"losses_fn: expected a function (model, inputs) -> {{objective: loss}}, got {losses_fn!r}")
        if self.objectives is None:
            if losses_fn is not None:
                raise ValueError("losses_fn: expected objectives=(...) with it (the two-objective trainer splits the loss itself)")
            return None
        if commit is not None:
            raise ValueError("commit: CoMMIT coordinates two objectives; expected objectives=None with it")
        if losses_fn is None and (self.arch is None or set(self.objectives) != set(OBJECTIVES)):
            raise ValueError(f"losses_fn: expected a function (model, inputs) -> {{objective: loss}} for the objectives "
                             f"{self.objectives} (without one: arch= and the objectives {OBJECTIVES}, in any order)")
        return losses_fn

    def _many_losses(self, model, inputs: dict, counts=None) -> dict:
        if self.losses_fn is None:
            return objective_losses_for(model, inputs, self.arch, num_items=counts)
        losses = self.losses_fn(model, inputs)
        if not isinstance(losses, dict):
            raise ValueError(f"losses_fn: expected it to return a dict of objective -> loss, got {type(losses).__name__}")
        return losses

    # The image-token mask and Janus' image codes are not forward arguments: keep the
    # column-removal logic from dropping them.
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for key in (self.image_token_key, "image_codes"):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def _bind(self, model) -> None:
        """Rebuild ParetoLoRA on the DDP wrapper the training loop runs (see the module docstring)."""
        if model is self._pareto_bound_to or not isinstance(model, DistributedDataParallel):
            return
        if self.pareto.micro_batches:
            raise RuntimeError("training_step: the model was wrapped in DDP in the middle of an accumulation window")
        self.pareto = ParetoLoRA(model, **self._pareto_kwargs)
        self._pareto_bound_to = model

    def _image_tokens(self, batch: dict) -> dict:
        """modality_losses keyword for this batch: its mask, else the trainer's token range."""
        if batch.get("labels") is None:
            raise ValueError(
                "labels: expected a 'labels' entry in every batch (token ids, -100 where there is no target): "
                f"ParetoLoRATrainer splits the loss by the targets' modality; this batch has {sorted(batch)}"
            )
        mask = batch.get(self.image_token_key)
        if mask is None and self.image_token_range is None:
            raise ValueError(
                f"inputs: batch has no {self.image_token_key!r} and no image_token_range was given to the trainer"
            )
        return {"image_token_mask": mask} if mask is not None else {"image_token_range": self.image_token_range}

    def _split_inputs(self, inputs: dict) -> tuple[dict, torch.Tensor, dict]:
        image_tokens = self._image_tokens(inputs)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop(self.image_token_key, None)
        return inputs, labels, image_tokens

    def _losses(self, model, inputs: dict, num_items=None):
        if self.arch is not None:
            text, image = modality_losses_for(model, inputs, self.arch, num_items=num_items)
            return text, image, {"loss_text": text.detach(), "loss_image": image.detach()}
        model_inputs, labels, image_tokens = self._split_inputs(inputs)
        outputs = model(**model_inputs)
        loss_text, loss_image = modality_losses(outputs.logits, labels, num_items=num_items, **image_tokens)
        return loss_text, loss_image, outputs

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.objectives is not None:
            self._objective_counts = self._window_objective_counts(batch_samples, device)
            return batch_samples, num_items_in_batch
        # Per-modality target counts of the whole accumulation window: dividing each
        # micro-batch's summed loss by them makes k micro-batches equal one large batch.
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in batch_samples:
            if self.arch is not None:
                t, i = modality_token_counts_for(self.model, batch, self.arch)
            else:
                image_tokens = self._image_tokens(batch)  # checks 'labels' first
                t, i = modality_token_counts(batch["labels"], **image_tokens)
            counts += torch.stack([torch.as_tensor(t), torch.as_tensor(i)]).to(device=device, dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            # The global window's counts: training_step scales each rank's losses by the world size.
            counts = self.accelerator.reduce(counts, reduction="sum")
        self._modality_counts = (counts[0], counts[1])
        return batch_samples, num_items_in_batch

    def _window_objective_counts(self, batch_samples, device) -> dict | None:
        """Per-objective target counts of the window (objective_losses_for); None with a user's losses_fn."""
        if self.losses_fn is not None:
            return None
        counts = torch.zeros(len(OBJECTIVES), dtype=torch.float64, device=device)
        for batch in batch_samples:
            c = objective_token_counts_for(self.model, batch, self.arch)
            counts += torch.stack([torch.as_tensor(c[k]) for k in OBJECTIVES]).to(device=device, dtype=torch.float64)
        if self.accelerator.num_processes > 1:  # global counts, as for two objectives (training_step scales)
            counts = self.accelerator.reduce(counts, reduction="sum")
        return dict(zip(OBJECTIVES, counts))

    def _training_step_many(self, model, inputs):
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses = self._many_losses(model, inputs, self._objective_counts)
        if self._objective_counts is None:  # a user's losses (or outside the training loop): mean per micro-batch
            losses = {k: v / self.current_gradient_accumulation_steps for k, v in losses.items()}
        elif self.accelerator.num_processes > 1:  # global counts: see training_step
            losses = {k: v * self.accelerator.num_processes for k, v in losses.items()}
        self.pareto.accumulate(losses, scaler=self.accelerator.scaler)
        if self.accelerator.sync_gradients:
            self.pareto_report = self.pareto.integrate_accumulated()
            if self.recorder is not None:
                self.recorder.record(self.state.global_step + 1, self.pareto_report)
        return sum(losses.values()).detach()

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        self._bind(model)
        if not getattr(self, "_optimizer_checked", False):  # warns once: SGD with a norm-increasing rule
            self.pareto.check_optimizer(self.optimizer)
            self._optimizer_checked = True
        if self.objectives is not None:
            return self._training_step_many(model, inputs)
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss_text, loss_image, outputs = self._losses(model, inputs, num_items=self._modality_counts)
        if self.commit is not None and self.accelerator.sync_gradients:  # CoMMIT measures on this batch
            model_inputs, labels, _ = self._split_inputs(inputs)
            mask = torch.zeros_like(labels, dtype=torch.bool)  # logits[:, t] predicts labels[:, t + 1]
            mask[:, :-1] = labels[:, 1:] != -100
            self._commit_batch = (model_inputs, outputs.logits.detach(), mask)
        if self._modality_counts is None:  # called outside the training loop: plain mean per micro-batch
            loss_text = loss_text / self.current_gradient_accumulation_steps
            loss_image = loss_image / self.current_gradient_accumulation_steps
        elif self.accelerator.num_processes > 1:
            # Global counts: DDP's average of the ranks' gradients of world * (rank sum / global count)
            # is the gradient of the global token mean (and the logged mean over ranks is that loss).
            loss_text = loss_text * self.accelerator.num_processes
            loss_image = loss_image * self.accelerator.num_processes
        self.pareto.accumulate(text=loss_text, image=loss_image, scaler=self.accelerator.scaler)
        if self.accelerator.sync_gradients:
            self.pareto_report = self.pareto.integrate_accumulated()
            if self.recorder is not None:
                self.recorder.record(self.state.global_step + 1, self.pareto_report)
        return (loss_text + loss_image).detach()

    def _commit_forward(self):
        with self.compute_loss_context_manager():
            return self.model(**self._commit_batch[0]).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Text + image loss, or the sum of the K losses (used by evaluation; training goes through ``training_step``)."""
        if self.objectives is not None:
            loss = sum(self._many_losses(model, inputs).values())
            return (loss, None) if return_outputs else loss
        loss_text, loss_image, outputs = self._losses(model, inputs)
        loss = loss_text + loss_image
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.pareto_report is not None:
            # Reading the report is the step's one host sync; it happens only on logging steps.
            logs.update(self.pareto_report.as_dict(layers=self.log_layers))
        if "loss" in logs and self.commit is not None:
            logs.update({f"pareto/{k}": v for k, v in self.commit.metrics().items()})
        super().log(logs, start_time)

    # ---- checkpoints: ParetoLoRA's state travels with the optimizer's ------------------------------
    STATE_FILE = "pareto_lora.pt"
    COMMIT_FILE = "pareto_lora_commit.pt"  # CoMMIT's kappa history and step count, when commit= is set

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.pareto.state_dict(), os.path.join(output_dir, self.STATE_FILE))
            if self.commit is not None:
                torch.save(self.commit.state_dict(), os.path.join(output_dir, self.COMMIT_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, self.STATE_FILE) if checkpoint is not None else None
        if path is not None and os.path.isfile(path):
            self.pareto.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        commit_path = os.path.join(checkpoint, self.COMMIT_FILE) if checkpoint is not None else None
        if self.commit is not None and commit_path is not None and os.path.isfile(commit_path):
            self.commit.load_state_dict(torch.load(commit_path, map_location="cpu", weights_only=True))

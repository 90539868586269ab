"""One rank of the 2-process CPU/gloo runs behind tests/distributed/test_umm_distributed.py.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _umm_worker.py OUT_DIR

Launched like ``torchrun`` would (the environment only): the first scenario is a
``ParetoLoRATrainer``, whose TrainingArguments / accelerate set up the gloo process group and wrap
the model in DDP inside ``train()``; the raw-DDP scenarios that follow reuse that group. Saves
what the parent checks to OUT_DIR/rank{RANK}.pt; the parent computes the single-process
references.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "archs")]  # models.py, arch_models.py

import arch_models as am  # noqa: E402
import models  # noqa: E402
import pareto_lora  # noqa: E402
from _launch import fully_shard_model, shut_down  # noqa: E402
from pareto_lora import archs  # noqa: E402

NUM_GROUPS = 2
BUCKET_MB = 0.002  # small buckets: each group spans several (rebuilt after step 1)
TRAIN = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1)


def llama_example(i: int) -> dict:
    # Image spans of different lengths: the ranks' windows have different token counts.
    return {k: v[0] for k, v in models.token_batch(batch=1, seed=i, image_span=(4 + i % 5, 16)).items()}


class Examples(torch.utils.data.Dataset):
    def __init__(self, make, n: int):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


def grads_of(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def trainer_scenario(key: str, model, dataset, out: dict, **trainer_kw) -> None:
    import transformers

    class Recording(pareto_lora.ParetoLoRATrainer):
        """Keeps the micro-batches this rank saw and the gradients the optimizer is given."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            out.setdefault(f"{key}/inputs", []).append({k: v.detach().clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    class Snapshot(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            out[f"{key}/grads"] = grads_of(model)

    args = transformers.TrainingArguments(
        output_dir=os.path.join(sys.argv[1], key), use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no",
        disable_tqdm=True, learning_rate=0.0, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
        ddp_bucket_cap_mb=BUCKET_MB, **TRAIN)
    trainer = Recording(model=model, args=args, train_dataset=dataset, num_groups=NUM_GROUPS, modulate="all",
                        callbacks=[Snapshot()], **trainer_kw)
    out[f"{key}/world_before_train"] = trainer.args.world_size
    trainer.train()
    sync = trainer.pareto._sync
    out[f"{key}/bound_to_wrapper"] = isinstance(trainer.model_wrapped, DDP) and getattr(sync, "ddp", None) is trainer.model_wrapped
    out[f"{key}/hook_ran"] = bool(getattr(sync, "trace", None))  # DDPSync only
    out[f"{key}/find_unused"] = bool(trainer.model_wrapped.find_unused_parameters)
    out[f"{key}/logged_loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out[f"{key}/report_losses"] = (trainer.pareto_report.loss_text, trainer.pareto_report.loss_image)


def ddp_scenario(key: str, name: str, rank: int, out: dict, steps: int = 2, **ddp_kw) -> None:
    """The three lines on a DDP-wrapped model, one batch per rank and step."""
    ddp = DDP(am.lora(am.MODELS[name]()), bucket_cap_mb=BUCKET_MB, **ddp_kw)
    pl = pareto_lora.ParetoLoRA(ddp, arch="auto", num_groups=NUM_GROUPS, modulate="all")
    for step in range(steps):
        batch = am.BATCHES[name](seed=1000 + 10 * step + rank)
        text, image = archs.modality_losses_for(ddp, batch)
        report = pl.backward(text=text, image=image)
        out[f"{key}/step{step}"] = grads_of(ddp.module)
        out[f"{key}/step{step}/cases"] = report.cases
        out[f"{key}/step{step}/losses"] = (report.loss_text, report.loss_image)
        out[f"{key}/step{step}/buckets"] = len(pl._sync.trace)
        ddp.zero_grad(set_to_none=True)


def fsdp_scenario(key: str, name: str, rank: int, out: dict) -> None:
    """The three lines on an FSDP2-sharded model (each decoder layer, then the root), the losses from
    archs.modality_losses_for: it runs the root's forward, whose embeddings and heads are sharded outside it."""
    base = am.MODELS[name]()
    # no LoRA in a frozen VQ model
    model = fully_shard_model(am.lora(base, exclude_modules=archs.detect_arch(base).lora_exclude_modules))
    pl = pareto_lora.ParetoLoRA(model, arch="auto", num_groups=NUM_GROUPS, modulate="all")
    text, image = archs.modality_losses_for(model, am.BATCHES[name](seed=2000 + rank))
    report = pl.backward(text=text, image=image)
    out[key] = {n: p.grad.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out[f"{key}/cases"] = report.cases
    out[f"{key}/losses"] = (report.loss_text, report.loss_image)


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    out: dict = {}
    trainer_scenario("trainer/chameleon", am.lora(am.MODELS["chameleon"]()), Examples(lambda i: am.example("chameleon", i), 8),
                     out, arch="auto")
    trainer_scenario("trainer/llama", models.lora_llama(num_layers=4), Examples(llama_example, 8), out)
    ddp_scenario("ddp/chameleon", "chameleon", rank, out)
    # find_unused_parameters=True (the Trainer's default for PEFT models): the losses are the DDP
    # forward's output, so the generation head applied to the hidden states is found as used.
    ddp_scenario("ddp/janus_unused", "janus", rank, out, find_unused_parameters=True)
    for name in am.ARCHS:
        fsdp_scenario(f"fsdp/{name}", name, rank, out)
    torch.save(out, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    shut_down(True)


if __name__ == "__main__":
    main()

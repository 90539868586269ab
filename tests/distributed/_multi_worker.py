"""One rank of the 2-process CPU/gloo runs behind tests/distributed/test_multi_distributed.py (issue 29).

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _multi_worker.py OUT_DIR

Launched like ``torchrun`` would (the environment only). K = 3 objectives under DDP (the
communication hook), FSDP2 and a ``ParetoLoRATrainer`` (which wraps the model in DDP itself) in one
process group; saves what the parent checks to OUT_DIR/rank{RANK}.pt. The parent computes the
single-process references.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "archs")]  # models.py, arch_models.py

import arch_models as am  # noqa: E402
import models  # noqa: E402
import pareto_lora  # noqa: E402
from _launch import fully_shard_model, shut_down  # noqa: E402
from pareto_lora import archs  # noqa: E402

NUM_LAYERS = 5
NUM_GROUPS = 2
BUCKET_MB = 0.0025  # ~2.6 KB buckets: every group spans several (rebuilt after step 1)
NAMES = ("prompt", "answer", "image")
RULES = {"mean": {}, "constant": {"weights": (0.5, 1.5, 1.0)}}
#: stats_ema and preserve_norm (the rule runs once per step under DDP and FSDP2 alike), with a rule that reads the Gram
OPTIONS = {"stats_ema": 0.6, "preserve_norm": True}
OPTIONS_RULE = "upgrad"


def batch_for(rank: int, base: int) -> dict:
    return models.token_batch(batch=2, seq=24, seed=base + rank, image_span=(6, 16))


def three_losses(model, batch) -> dict:
    """prompt (text targets before position 6), answer (text after), image: token means."""
    logits = model(**models.model_inputs(batch)).logits[:, :-1].float()
    labels, image = batch["labels"][:, 1:], batch["image_token_mask"][:, 1:]
    early = torch.arange(labels.shape[1]) < 6
    return {"prompt": F.cross_entropy(logits[~image & early], labels[~image & early]),
            "answer": F.cross_entropy(logits[~image & ~early], labels[~image & ~early]),
            "image": F.cross_entropy(logits[image], labels[image])}


def janus_batch(rank: int, step: int) -> dict:
    """Row 0: 16 <image> placeholders (an understanding input) then a text-to-image sample; row 1 without."""
    base = am.janus_batch(seed=7 + 10 * step + rank)
    n = 16
    pad = torch.randint(2, am.JANUS_BOI, (2, n), generator=torch.Generator().manual_seed(3 + rank))
    pad[0] = am.JANUS_IMAGE_TOKEN
    ids = torch.cat([pad, base["input_ids"]], 1)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "image_codes": torch.cat([torch.full((2, n), -100), base["image_codes"]], 1),
            "pixel_values": torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(rank + step))}


def grads_of(module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[n] = g.detach().clone()
    return out


def pareto(model, rule: str, **kw):
    return pareto_lora.ParetoLoRA(model, rule=rule, num_groups=NUM_GROUPS, modulate="all", objectives=NAMES,
                                  backend="reference", **RULES.get(rule, {}), **kw)


def record(out: dict, key: str, module, report) -> None:
    out[key] = grads_of(module)
    out[f"{key}/group_stats"] = report.group_stats.clone()
    out[f"{key}/losses"] = report.losses
    out[f"{key}/cases"] = report.cases


def inf_on_rank1(losses: dict, rank: int) -> dict:
    """The first objective's loss infinite on rank 1 (its gradient too); the last objective's stays finite."""
    if rank == 1:
        losses["prompt"] = losses["prompt"] * float("inf")
    return losses


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the parent checks type and message
        return f"{type(e).__name__}: {e}"
    return "no error"


def ddp_scenarios(rank: int, out: dict) -> None:
    for rule in RULES:  # two steps each: DDP's initial buckets, then the rebuilt ones
        ddp = DDP(models.lora_llama(num_layers=NUM_LAYERS), bucket_cap_mb=BUCKET_MB)
        pl = pareto(ddp, rule)
        for step in range(2):
            report = pl.backward(three_losses(ddp, batch_for(rank, 10 * step)))
            record(out, f"ddp/{rule}/step{step}", ddp.module, report)
            ddp.zero_grad(set_to_none=True)
        if rule != "constant":
            continue
        # Accumulation: the first micro-batch inside no_sync (local), the last synchronised.
        with ddp.no_sync():
            pl.accumulate({k: v / 2 for k, v in three_losses(ddp, batch_for(rank, 300)).items()})
        pl.accumulate({k: v / 2 for k, v in three_losses(ddp, batch_for(rank, 400)).items()})
        record(out, "ddp/no_sync", ddp.module, pl.integrate_accumulated())
        # ... and every micro-batch synchronised: the averages go on accumulating.
        for base in (300, 400):
            pl.accumulate({k: v / 2 for k, v in three_losses(ddp, batch_for(rank, base)).items()})
        record(out, "ddp/synced", ddp.module, pl.integrate_accumulated())
        # The last micro-batch inside no_sync: refused (that window then goes on outside it).
        with ddp.no_sync():
            pl.accumulate(three_losses(ddp, batch_for(rank, 700)))
        out["err/last_in_no_sync"] = error_of(pl.integrate_accumulated)
        # Transactional: a loss that reaches no LoRA parameter changes nothing. (Its forward armed
        # DDP's reducer, so it runs last here: DDP would reduce even inside a later no_sync.)
        pl.accumulate(three_losses(ddp, batch_for(rank, 500)))
        before = grads_of(ddp.module)
        losses = three_losses(ddp, batch_for(rank, 600))
        losses["answer"] = losses["answer"].detach().requires_grad_()
        out["err/unreached"] = error_of(lambda: pl.accumulate(losses))
        out["err/unchanged"] = all(torch.equal(before[n], g) for n, g in grads_of(ddp.module).items())
        out["err/micro"] = pl.micro_batches
        out["err/state_dict"] = error_of(pl.state_dict)
        pl.integrate_accumulated()
        # The hook fails in a reduction callback (a bad plan): SyncFailure after the backward, the
        # window dropped, .grad NaN; the next step is the normal one again.
        plan = pl._sync._plan
        pl._sync._plan = lambda params: (lambda v, n: (v, [*n[:-1], n[-1] + 1]))(*plan(params))
        out["err/hook"] = error_of(lambda: pl.backward(three_losses(ddp, batch_for(rank, 0))))
        del pl._sync._plan
        out["err/hook_micro"] = pl.micro_batches
        out["err/hook_nan"] = all(bool(g.isnan().all()) for g in grads_of(ddp.module).values())
        record(out, "ddp/after_failure", ddp.module, pl.backward(three_losses(ddp, batch_for(rank, 0))))
        # A non-finite loss on rank 1 only: every rank settles the same global losses alike.
        for mode in ("raise", "skip"):
            pl.on_nonfinite = mode
            losses = three_losses(ddp, batch_for(rank, 0))
            if rank == 1:
                losses["image"] = losses["image"] * float("inf")
            out[f"nonfinite/{mode}"] = error_of(lambda: out.setdefault("nonfinite/report", pl.backward(losses)))
            out[f"nonfinite/{mode}/micro"] = pl.micro_batches
        report = out.pop("nonfinite/report")
        out["nonfinite/cases"], out["nonfinite/loss_finite"] = report.cases, report.losses
        out["nonfinite/grads_nan"] = all(bool(g.isnan().all()) for g in grads_of(ddp.module).values())
        # "raise" with an objective other than the last one non-finite on rank 1: .grad, the averaged
        # (finite) last objective, is left NaN on every rank, as on the two-objective DDP path.
        pl.on_nonfinite = "raise"
        out["refused/raise"] = error_of(lambda: pl.backward(inf_on_rank1(three_losses(ddp, batch_for(rank, 0)), rank)))
        out["refused/micro"] = pl.micro_batches
        out["refused/grads_nan"] = all(bool(g.isnan().all()) for g in grads_of(ddp.module).values())
        record(out, "ddp/after_refusal", ddp.module, pl.backward(three_losses(ddp, batch_for(rank, 0))))
        pl.on_nonfinite = "auto"
    out["err/bucket_view"] = error_of(lambda: pareto(DDP(models.lora_llama(num_layers=2), gradient_as_bucket_view=True),
                                                     "mean"))
    out["err/static_graph"] = error_of(lambda: pareto(DDP(models.lora_llama(num_layers=2), static_graph=True), "mean"))


def options_scenarios(rank: int, out: dict) -> None:
    """Two steps with OPTIONS under DDP and under FSDP2: the running average carries across the steps."""
    ddp = DDP(models.lora_llama(num_layers=NUM_LAYERS), bucket_cap_mb=BUCKET_MB)
    pl = pareto(ddp, OPTIONS_RULE, **OPTIONS)
    for step in range(2):
        record(out, f"options/ddp/step{step}", ddp.module, pl.backward(three_losses(ddp, batch_for(rank, 10 * step))))
        ddp.zero_grad(set_to_none=True)
    out["options/ddp/ema"] = pl.options._ema.clone()
    model = fully_shard_model(models.lora_llama(num_layers=NUM_LAYERS))
    pl = pareto(model, OPTIONS_RULE, **OPTIONS)
    for step in range(2):
        record(out, f"options/fsdp/step{step}", model, pl.backward(three_losses(model, batch_for(rank, 10 * step))))
    out["options/fsdp/ema"] = pl.options._ema.clone()


TEXT_LAST = ("generation", "understanding", "text")
#: tag -> (objectives, DDP keywords)
JANUS_ORDERS = {"text_first": (archs.OBJECTIVES, {}), "text_last": (TEXT_LAST, {}),
                "text_last_unused": (TEXT_LAST, {"find_unused_parameters": True})}


def janus_scenario(rank: int, out: dict) -> None:
    """issue 29: a 3-objective Janus LoRA step end to end through 2-process gloo DDP (two steps). With
    "text" last, the objective whose backward drives DDP never reaches the image projector."""
    for tag, (objectives, ddp_kw) in JANUS_ORDERS.items():
        torch.manual_seed(0)
        ddp = DDP(am.lora(am.MODELS["janus"]()), bucket_cap_mb=BUCKET_MB, **ddp_kw)
        pl = pareto_lora.ParetoLoRA(ddp, rule="constant", weights=(0.5, 2.0, 1.5), arch="auto", num_groups=2,
                                    modulate=("lower", "generation"), objectives=objectives, backend="reference")
        for step in range(2):
            report = pl.backward(archs.objective_losses_for(ddp, janus_batch(rank, step), pl.arch))
            record(out, f"janus/{tag}/step{step}", ddp.module, report)
            ddp.zero_grad(set_to_none=True)


def janus_fsdp_scenario(rank: int, out: dict) -> None:
    """The 3-objective Janus step (text first) under FSDP2: each decoder layer and the root sharded, the
    losses from archs.objective_losses_for, which runs the root's forward (the embeddings inside it)."""
    torch.manual_seed(0)
    model = fully_shard_model(am.lora(am.MODELS["janus"]()))
    pl = pareto_lora.ParetoLoRA(model, rule="constant", weights=(0.5, 2.0, 1.5), arch="auto", num_groups=2,
                                modulate=("lower", "generation"), objectives=archs.OBJECTIVES, backend="reference")
    record(out, "janus/fsdp/step0", model, pl.backward(archs.objective_losses_for(model, janus_batch(rank, 0), pl.arch)))


def fsdp_scenarios(rank: int, out: dict) -> None:
    model = fully_shard_model(models.lora_llama(num_layers=NUM_LAYERS))
    pl = pareto(model, "constant")
    record(out, "fsdp/step", model, pl.backward(three_losses(model, batch_for(rank, 0))))
    pl.accumulate({k: v / 2 for k, v in three_losses(model, batch_for(rank, 300)).items()})
    # A checkpoint mid-window (each rank its shards) resumes exactly in another ParetoLoRA.
    state = pl.state_dict()
    pl = pareto(model, "constant")
    pl.load_state_dict(state)
    pl.accumulate({k: v / 2 for k, v in three_losses(model, batch_for(rank, 400)).items()})
    before = [p.grad for p in model.parameters() if p.requires_grad]
    losses = three_losses(model, batch_for(rank, 600))
    losses["answer"] = losses["answer"].detach().requires_grad_()
    out["fsdp/err/unreached"] = error_of(lambda: pl.accumulate(losses))
    out["fsdp/err/grad_kept"] = all(p.grad is g for p, g in zip((p for p in model.parameters() if p.requires_grad), before))
    record(out, "fsdp/accum", model, pl.integrate_accumulated())
    # "raise" on a loss non-finite on rank 1 only: refused on every rank, the window dropped, and the
    # next step is the normal one; .grad in between is NaN (it held FSDP's last reduce-scatter), as under DDP.
    pl.on_nonfinite = "raise"
    out["fsdp/refused/raise"] = error_of(lambda: pl.backward(inf_on_rank1(three_losses(model, batch_for(rank, 0)), rank)))
    out["fsdp/refused/micro"] = pl.micro_batches
    out["fsdp/refused/grads_nan"] = all(bool(g.isnan().all()) for g in grads_of(model).values())
    record(out, "fsdp/after_refusal", model, pl.backward(three_losses(model, batch_for(rank, 0))))


def janus_example(i: int) -> dict:
    """One Janus example with all three kinds (tests/archs/test_arch_objectives.janus_mixed_example):
    16 <image> placeholders (+ pixel_values), text, <begin_of_image>, 3 + i % 4 VQ codes; the last
    i % 4 labels ignored, so the ranks' windows have different target counts."""
    gen = torch.Generator().manual_seed(200 + i)
    ids = torch.randint(2, am.JANUS_BOI, (32,), generator=gen)
    ids[4:20] = am.JANUS_IMAGE_TOKEN
    codes = torch.full_like(ids, -100)
    ids[23] = am.JANUS_BOI
    n = 3 + i % 4
    codes[24 : 24 + n] = torch.randint(0, am.JANUS_CODES, (n,), generator=gen)
    ids[24 : 24 + n] = 0
    labels = ids.clone()
    labels[32 - i % 4 :] = -100
    return {"input_ids": ids, "labels": labels, "image_codes": codes, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(3, 20, 20, generator=gen)}


class JanusExamples(torch.utils.data.Dataset):
    def __len__(self):
        return 8  # one step: 2 ranks x 2 micro-batches x 2 examples

    def __getitem__(self, i):
        return janus_example(i)


def trainer_scenario(out_dir: str, out: dict) -> None:
    """ParetoLoRATrainer(objectives=OBJECTIVES) under DDP (GA 2: no_sync, then the synchronised micro-batch)."""
    import transformers

    torch.manual_seed(0)
    model = am.lora(am.MODELS["janus"]())

    class Snapshot(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            out["trainer/grads"] = grads_of(model)

    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no",
        disable_tqdm=True, learning_rate=0.0, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
        ddp_bucket_cap_mb=BUCKET_MB, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
    trainer = pareto_lora.ParetoLoRATrainer(
        model=model, args=args, train_dataset=JanusExamples(), arch="auto", num_groups=2, modulate="all",
        objectives=archs.OBJECTIVES, rule="constant", pareto_kwargs={"weights": (1.0, 0.5, 2.0), "backend": "reference"},
        callbacks=[Snapshot()])
    trainer.train()
    out["trainer/bound_to_wrapper"] = isinstance(trainer.model_wrapped, DDP) and \
        getattr(trainer.pareto._sync, "ddp", None) is trainer.model_wrapped
    out["trainer/losses"] = trainer.pareto_report.losses
    out["trainer/group_stats"] = trainer.pareto_report.group_stats.clone()


def main() -> None:
    rank, out_dir = int(os.environ["RANK"]), sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    out: dict = {}
    ok = False
    try:
        ddp_scenarios(rank, out)
        janus_scenario(rank, out)
        janus_fsdp_scenario(rank, out)
        fsdp_scenarios(rank, out)
        options_scenarios(rank, out)
        trainer_scenario(out_dir, out)  # the Trainer (accelerate) takes the process group already set up
        ok = True
    finally:
        shut_down(ok)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()

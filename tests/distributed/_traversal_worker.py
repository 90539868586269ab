"""One rank of tests/distributed/test_traversal_ddp.py: DDP and FSDP2 with non-reentrant activation checkpointing.

    python tests/distributed/_traversal_worker.py RANK WORLD PORT OUT_DIR

DDP: the same steps under ``traversal="two_pass"`` and ``"auto"`` (one batched backward, the image
gradient handed to DDP's hook by a replay from the parameters), on small buckets that groups
span and on one bucket, initial and rebuilt; with ``find_unused_parameters=True``; accumulated over
two micro-batches (the first inside ``no_sync()``, or both synchronised); through a GradScaler.
``local/bitwise`` says whether one process's batched buffers equal its two-pass ones on this
rank's batch (then DDP's results must be bitwise equal too). FSDP2: the same steps and
accumulation, ``"auto"`` taking one batched traversal reduce-scattered outside FSDP2. K = 3
objectives under DDP, two steps and an accumulation, K passes against one batched traversal.
Each rank saves its integrated gradients and the errors of what is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _dist_worker.py, models.py

import _dist_worker as W  # noqa: E402
import pareto_lora  # noqa: E402
from _launch import shut_down  # noqa: E402
from pareto_lora.distributed.traversal import checkpointing_modules  # noqa: E402
from pareto_lora.training import ParetoLoRA  # noqa: E402

TRAVERSALS = ("two_pass", "auto")


def checkpointed_model(r: int = 4):
    model = W.models.lora_llama(num_layers=W.NUM_LAYERS, r=r)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def ddp_of(layout: str, **kw):
    model = checkpointed_model()
    cap = pareto_lora.distributed.one_bucket_cap_mb(model) if layout == "one" else W.BUCKET_MB
    return DDP(model, bucket_cap_mb=cap, **kw)


def local_bitwise(rank: int) -> bool:
    """One process, this rank's batch: batched buffers == two-pass buffers (both objectives)."""
    model, bufs = checkpointed_model(), []
    for traversal in ("two_pass", "batched"):
        pl = W.pareto(model, traversal=traversal)
        pl.accumulate(*W.losses_of(model, W.batch_for(rank, 0)))
        bufs.append([f.clone() for f in pl.text.flats + pl.image.flats])
        pl.integrate_accumulated()
        model.zero_grad(set_to_none=True)
    return all(torch.equal(a, b) for a, b in zip(*bufs))


def ddp_scenarios(rank: int, out: dict) -> None:
    for traversal in TRAVERSALS:
        for layout in ("small", "one"):
            ddp = ddp_of(layout)
            pl = W.pareto(ddp, traversal=traversal)
            for step in range(2):  # initial and rebuilt buckets
                report = pl.backward(*W.losses_of(ddp, W.batch_for(rank, 100 * step)))
                key = f"{layout}/{traversal}/step{step}"
                out[key], out[f"{key}/taken"] = W.grads_of(ddp.module), pl._sync.last_traversal
                out[f"{key}/cases"] = report.cases
                plans = {plan.key: plan for plan in pl._sync._plans.values()}
                out[f"{key}/whole"] = [plans[k].whole for k, _, _ in pl._sync.trace]  # this backward's buckets
                ddp.module.zero_grad(set_to_none=True)
        ddp = ddp_of("small", find_unused_parameters=True)  # the HF Trainer's default for PEFT models
        pl = W.pareto(ddp, traversal=traversal)
        for step in range(2):
            pl.backward(*W.losses_of(ddp, W.batch_for(rank, 100 * step)))
            out[f"unused/{traversal}/step{step}"] = W.grads_of(ddp.module)
            out[f"unused/{traversal}/step{step}/taken"] = pl._sync.last_traversal
            ddp.module.zero_grad(set_to_none=True)
        for synced in (False, True):
            ddp = ddp_of("small")
            pl = W.pareto(ddp, traversal=traversal)
            for base in (300, 400):
                with contextlib.nullcontext() if synced or base == 400 else ddp.no_sync():
                    lt, li = W.losses_of(ddp, W.batch_for(rank, base))
                    pl.accumulate(lt / 2, li / 2)
            pl.integrate_accumulated()
            key = f"accum{'_synced' if synced else ''}/{traversal}"
            out[key], out[f"{key}/taken"] = W.grads_of(ddp.module), pl._sync.last_traversal
        ddp = ddp_of("small")
        pl = W.pareto(ddp, traversal=traversal)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        pl.backward(*W.losses_of(ddp, W.batch_for(rank, 0)), scaler=scaler)
        out[f"scaler/{traversal}"] = W.grads_of(ddp.module)
    out["err/sum_first"] = W.error_of(lambda: W.pareto(ddp_of("small"), traversal="sum_first"))
    out["err/static_graph"] = W.error_of(lambda: W.pareto(ddp_of("small", static_graph=True)))


NAMES = ("prompt", "answer", "image")


def three_losses(model, batch):
    """K = 3 (prompt: text before the image, answer: text after it, image), through `model`'s forward."""
    logits = model(**W.models.model_inputs(batch)).logits[:, :-1]
    labels, image = batch["labels"][:, 1:], batch["image_token_mask"][:, 1:]
    early = torch.arange(labels.shape[1]) < 6
    masks = {"prompt": ~image & early, "answer": ~image & ~early, "image": image}
    return {k: torch.nn.functional.cross_entropy(logits[m], labels[m]) for k, m in masks.items()}


def k_scenarios(rank: int, out: dict) -> None:
    """K = 3 under DDP: "auto" takes one batched traversal (the last objective replayed into DDP's hook)."""
    model, bufs = checkpointed_model(), []
    for traversal in TRAVERSALS:  # one process, this rank's batch: batched == K passes, bitwise?
        pl = ParetoLoRA(model, num_groups=W.NUM_GROUPS, objectives=NAMES, traversal=traversal)
        pl.accumulate(**three_losses(model, W.batch_for(rank, 0)))
        bufs.append([f.clone() for g in pl.grads for f in g.flats])
        pl.integrate_accumulated()
    out["k/local/bitwise"] = all(torch.equal(a, b) for a, b in zip(*bufs))
    for traversal in TRAVERSALS:
        ddp = ddp_of("small")
        pl = ParetoLoRA(ddp, num_groups=W.NUM_GROUPS, objectives=NAMES, traversal=traversal)
        for step in range(2):
            pl.backward(**three_losses(ddp, W.batch_for(rank, 100 * step)))
            out[f"k/{traversal}/step{step}"] = W.grads_of(ddp.module)
            out[f"k/{traversal}/step{step}/taken"] = pl._sync.last_traversal
        for base in (300, 400):
            with contextlib.nullcontext() if base == 400 else ddp.no_sync():
                pl.accumulate(**{k: v / 2 for k, v in three_losses(ddp, W.batch_for(rank, base)).items()})
        pl.integrate_accumulated()
        out[f"k/{traversal}/accum"] = W.grads_of(ddp.module)


def fsdp_model(mesh, r: int = 4, **kw):
    from torch.distributed.fsdp import fully_shard

    model = checkpointed_model(r)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, **kw)
    return fully_shard(model, mesh=mesh, **kw)


def fsdp_scenarios(rank: int, world: int, out: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (world,))
    for traversal in TRAVERSALS:
        model = fsdp_model(mesh)
        pl = W.pareto(model, traversal=traversal)
        for step in range(2):
            report = pl.backward(*W.losses_of(model, W.batch_for(rank, 100 * step)))
            key = f"fsdp/{traversal}/step{step}"
            out[key], out[f"{key}/coeffs"] = W.grads_of(model), report.step.coeffs.clone()
            out[f"{key}/taken"] = pl._sync.last_traversal
            out[f"{key}/checkpointed"] = all(m.gradient_checkpointing for m in checkpointing_modules(model))
            model.zero_grad(set_to_none=True)
        for base in (300, 400):
            lt, li = W.losses_of(model, W.batch_for(rank, base))
            pl.accumulate(lt / 2, li / 2)
        pl.integrate_accumulated()
        out[f"fsdp/{traversal}/accum"] = W.grads_of(model)
    # LoRA rank 3 and 1: lora_A's 3 rows shard as 2 + 1, its single row as 1 + 0 (an empty shard).
    for r in (3, 1):
        for traversal in TRAVERSALS:
            model = fsdp_model(mesh, r)
            pl = W.pareto(model, traversal=traversal)
            pl.backward(*W.losses_of(model, W.batch_for(rank, 0)))
            out[f"fsdp/r{r}/{traversal}"], out[f"fsdp/r{r}/{traversal}/taken"] = W.grads_of(model), pl._sync.last_traversal
            out[f"fsdp/r{r}/{traversal}/rows"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()
                                                  if p.requires_grad and "lora_A" in n}
    out["err/fsdp/k_batched"] = W.error_of(lambda: ParetoLoRA(fsdp_model(mesh), objectives=NAMES, traversal="batched"))
    out["err/fsdp/sum_first"] = W.error_of(lambda: ParetoLoRA(fsdp_model(mesh), traversal="sum_first"))
    # A MixedPrecisionPolicy: FSDP2 reduces in its own dtype, which a reduction outside it cannot know.
    model = fsdp_model(mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    pl = W.pareto(model, traversal="batched")
    out["err/fsdp/mixed_precision"] = W.error_of(lambda: pl.backward(*W.losses_of(model, W.batch_for(rank, 0))))
    out["fsdp/mixed_precision/untouched"] = all(p.grad is None for p in model.parameters())
    # A forward before ParetoLoRA existed: its capture has seen no unsharded parameter.
    model = fsdp_model(mesh)
    losses = W.losses_of(model, W.batch_for(rank, 0))
    pl = W.pareto(model, traversal="batched")
    out["err/fsdp/no_forward"] = W.error_of(lambda: pl.backward(*losses))
    out["fsdp/no_forward/untouched"] = all(p.grad is None for p in model.parameters())


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    out = {"local/bitwise": local_bitwise(rank)}
    ok = False
    try:
        ddp_scenarios(rank, out)
        k_scenarios(rank, out)
        fsdp_scenarios(rank, world, out)
        ok = True
    finally:
        shut_down(ok)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

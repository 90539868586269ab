"""One rank of the 2-process CPU/gloo runs behind tests/test_distributed.py.

    python tests/_dist_worker.py RANK WORLD PORT OUT_DIR

Runs every scenario in one process group (process start-up and imports dominate the cost) and
saves what the parent test checks to OUT_DIR/rank{RANK}.pt. The parent computes the
single-process references itself.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: models.py

import models  # noqa: E402
import pareto_lora  # noqa: E402
from _launch import fully_shard_model, shut_down  # noqa: E402
from pareto_lora.distributed import sharded_integrate  # noqa: E402
from pareto_lora.flat import PythonRule  # noqa: E402

NUM_LAYERS = 5
NUM_GROUPS = 2
BUCKET_MB = 0.0025  # ~2.6 KB buckets: one layer's LoRA gradients (8 KB) span 3-4, so every group does too
RULES = ("pareto_lora", "mgda", "upgrad", "cagrad")  # the paper's rule, MGDA and two of the family


def batch_for(rank: int, base: int, image: bool = True) -> dict:
    return models.token_batch(batch=2, seq=24, seed=base + rank, image_span=(6, 16) if image else None)


def losses_of(model, batch):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


def grads_of(module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[n] = g.detach().clone()
    return out


def ddp_model(**kw):
    return DDP(models.lora_llama(num_layers=NUM_LAYERS), bucket_cap_mb=BUCKET_MB, **kw)


def pareto(model, rule: str = "pareto_lora", **kw):
    return pareto_lora.ParetoLoRA(model, rule=rule, tau=0.5, num_groups=NUM_GROUPS, modulate="all", **kw)


def error_of(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, FloatingPointError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def reverse_arrivals(sync) -> None:
    """Hold every bucket's completion callback and run them in reverse once all have arrived."""
    held, lock, arrive = [], threading.Lock(), sync._arrive

    def deferred(state, *args):
        with lock:
            held.append((state, args))
            if state.num_buckets is None or len(held) < state.num_buckets:
                return
            calls = held[::-1]
            held.clear()
        for st, a in calls:
            arrive(st, *a)

    sync._arrive = deferred


def ddp_scenarios(rank: int, out: dict) -> None:
    for rule in RULES:
        ddp = ddp_model()
        pl = pareto(ddp, rule)
        # Step 0 runs on DDP's initial buckets, step 1 on the rebuilt ones (no optimizer step, so
        # the parameters, and hence the parent's reference, stay those of the initial model).
        for step in (0, 1):
            report = pl.backward(*losses_of(ddp, batch_for(rank, 100 * step)))
            out[f"ddp/{rule}/step{step}"] = grads_of(ddp.module)
            out[f"ddp/{rule}/step{step}/losses"] = (report.loss_text, report.loss_image)
            out[f"ddp/{rule}/step{step}/cases"] = report.cases
        names = {id(p): n for n, p in ddp.module.named_parameters()}
        out[f"ddp/{rule}/buckets"] = [[names[i] for i in key] for key in pl._sync._plans]

    # One bucket for all LoRA gradients (bucket_cap_mb above their size): every group is whole in
    # it, so the hook integrates it with one fused launch, also after DDP re-buckets (step 1).
    model = models.lora_llama(num_layers=NUM_LAYERS)
    ddp = DDP(model, bucket_cap_mb=pareto_lora.distributed.one_bucket_cap_mb(model))
    pl = pareto(ddp)
    for step in (0, 1):
        lt, li = losses_of(ddp, batch_for(rank, 100 * step))
        # The hook's work runs on the process group's callback threads: profile every thread.
        every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    experimental_config=every_thread) as prof:
            pl.backward(lt, li)
        out[f"whole/step{step}"] = grads_of(ddp.module)
        out[f"whole/step{step}/ops"] = sorted(e.name for e in prof.events() if e.name.startswith("pareto_lora::"))
        out[f"whole/step{step}/trace"] = pl._sync.trace
    out["whole/plans"] = [plan.whole for plan in pl._sync._plans.values()]

    # A Python rule (preserve_norm needs the group statistics before the coefficients): statistics
    # launch, the rule between, combine launch, on the initial (one) and the rebuilt (small) buckets.
    ddp = ddp_model()
    pl = pareto(ddp, preserve_norm=True)
    for step in (0, 1):
        pl.backward(*losses_of(ddp, batch_for(rank, 100 * step)))
        out[f"python_rule/step{step}"] = grads_of(ddp.module)

    # The trap: a second backward on the same forward is not all-reduced by DDP.
    ddp = ddp_model()
    lt, li = losses_of(ddp, batch_for(rank, 0))
    lt.backward(retain_graph=True)
    out["naive/text"] = grads_of(ddp.module)
    ddp.zero_grad(set_to_none=True)
    li.backward()
    out["naive/image"] = grads_of(ddp.module)

    ddp = ddp_model()
    pl = pareto(ddp)
    report = pl.backward(*losses_of(ddp, batch_for(rank, 200, image=rank == 0)))
    out["noimage"] = grads_of(ddp.module)
    out["noimage/losses"] = (report.loss_text, report.loss_image)

    ddp = ddp_model()
    pl = pareto(ddp)
    with ddp.no_sync():
        lt, li = losses_of(ddp, batch_for(rank, 300))
        pl.accumulate(lt / 2, li / 2)
    lt, li = losses_of(ddp, batch_for(rank, 400))
    pl.accumulate(lt / 2, li / 2)
    pl.integrate_accumulated()
    out["accum"] = grads_of(ddp.module)

    ddp = ddp_model()
    pl = pareto(ddp)
    for step in (0, 1):  # the combine already ran in the hook when the backward returns
        pl.accumulate(*losses_of(ddp, batch_for(rank, 100 * step)))
        before = grads_of(ddp.module)
        out[f"hook/step{step}"] = before
        out[f"hook/step{step}/trace"] = pl._sync.trace
        pl.integrate_accumulated()
        out[f"hook/step{step}/unchanged"] = all(torch.equal(before[n], g) for n, g in grads_of(ddp.module).items())
    keys = {id(p): i for i, p in enumerate(pl.layout.params)}
    out["hook/bucket_keys"] = sorted(min(keys[i] for i in key) for key in pl._sync._plans)

    # Rank 1 handles its reductions in the reverse order: the ranks must still agree bitwise.
    ddp = ddp_model()
    pl = pareto(ddp)
    if rank == 1:
        reverse_arrivals(pl._sync)
    for step in (0, 1):
        report = pl.backward(*losses_of(ddp, batch_for(rank, 100 * step)))
        out[f"reversed/step{step}"] = grads_of(ddp.module)
        out[f"reversed/step{step}/stats"] = report.step.unit_stats.clone()
        out[f"reversed/step{step}/order"] = [k for k, _, _ in pl._sync.trace]

        # Every micro-batch synchronised: each hook integrates, the next micro-batch undoes it.
    ddp = ddp_model()
    pl = pareto(ddp)
    for base in (300, 400):
        lt, li = losses_of(ddp, batch_for(rank, base))
        pl.accumulate(lt / 2, li / 2)
    pl.integrate_accumulated()
    out["accum_synced"] = grads_of(ddp.module)

    # A non-finite loss on one rank only: every rank learns it from the reduced losses.
    for mode in ("skip", "raise"):
        ddp = ddp_model()
        pl = pareto(ddp, on_nonfinite=mode)
        lt, li = losses_of(ddp, batch_for(rank, 0))
        if rank == 0:
            li = li + float("inf")  # infinite value, finite gradient
        if mode == "skip":
            out["nonfinite/skip/cases"] = pl.backward(lt, li).cases
        else:
            out["nonfinite/raise"] = error_of(lambda: pl.backward(lt, li))
        out[f"nonfinite/{mode}/all_nan"] = all(bool(g.isnan().all()) for g in grads_of(ddp.module).values())

    ddp = ddp_model()
    pl = pareto(ddp)

    def broken_rule(stats):
        raise ValueError("rule exploded")

    # A Python rule runs inside the hook (the kernel rule runs in the fused op): make it raise there.
    rule, pl._sync.rule = pl._sync.rule, PythonRule(broken_rule)
    out["err/hook_failure"] = error_of(lambda: pl.backward(*losses_of(ddp, batch_for(rank, 0))))
    out["err/hook_failure/all_nan"] = all(bool(g.isnan().all()) for g in grads_of(ddp.module).values())
    pl._sync.rule = rule  # DDP and ParetoLoRA are usable again
    out["err/after_failure"] = error_of(lambda: pl.backward(*losses_of(ddp, batch_for(rank, 0))))

    ddp = ddp_model()
    pl = pareto(ddp)
    out["err/second_hook"] = error_of(lambda: pareto(ddp))
    with ddp.no_sync():
        pl.accumulate(*losses_of(ddp, batch_for(rank, 500)))
    out["err/unsynced"] = error_of(pl.integrate)
    out["err/bucket_view"] = error_of(lambda: pareto(ddp_model(gradient_as_bucket_view=True)))
    module = models.lora_llama(num_layers=NUM_LAYERS)
    lora = next(n for n, p in module.named_parameters() if p.requires_grad)
    DDP._set_params_and_buffers_to_ignore_for_model(module, [lora])
    out["err/ignored_param"] = error_of(lambda: pareto(DDP(module, bucket_cap_mb=BUCKET_MB)))


def fsdp_scenarios(rank: int, world: int, out: dict) -> None:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        out["fsdp/available"] = False
        return
    out["fsdp/available"] = True
    mesh = init_device_mesh("cpu", (world,))
    for rule in RULES:
        model = fully_shard_model(models.lora_llama(num_layers=NUM_LAYERS))
        pl = pareto(model, rule)
        report = pl.backward(*losses_of(model, batch_for(rank, 0)))
        out[f"fsdp/{rule}"] = grads_of(model)
        out[f"fsdp/{rule}/losses"] = (report.loss_text, report.loss_image)
        out[f"fsdp/{rule}/coeffs"] = report.step.coeffs.clone()
        if rule == "pareto_lora":
            for base in (300, 400):
                lt, li = losses_of(model, batch_for(rank, base))
                pl.accumulate(lt / 2, li / 2)
            pl.integrate_accumulated()
            out["fsdp/accum"] = grads_of(model)
            # on_nonfinite="raise" with the image loss infinite on rank 0 only (its gradient finite): refused on
            # every rank, and .grad (FSDP2's last reduce-scatter) left NaN as under DDP; the next step is normal.
            pl.on_nonfinite = "raise"
            lt, li = losses_of(model, batch_for(rank, 0))
            out["fsdp/refused"] = error_of(lambda: pl.backward(lt, li + float("inf") if rank == 0 else li))
            out["fsdp/refused/micro"] = pl.micro_batches
            out["fsdp/refused/grads"] = grads_of(model)
            pl.backward(*losses_of(model, batch_for(rank, 0)))
            out["fsdp/after_refusal"] = grads_of(model)
    # the model helpers' losses (archs.modality_losses_for) under FSDP2: through the root's forward, whose
    # parameters (embeddings, LM head) are sharded outside it
    model = fully_shard_model(models.lora_llama(num_layers=NUM_LAYERS))
    pl = pareto(model)
    batch = batch_for(rank, 0)
    report = pl.backward(*pareto_lora.archs.modality_losses_for(model, batch))
    out["fsdp/archs"] = grads_of(model)
    out["fsdp/archs/losses"] = (report.loss_text, report.loss_image)
    # models sharded only in part, refused up front: layers sharded but not the root; a root whose
    # fully_shard ignored a trainable parameter (left a plain tensor)
    model = models.lora_llama(num_layers=NUM_LAYERS)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    out["fsdp/no_root"] = error_of(lambda: pareto(model))
    model = models.lora_llama(num_layers=NUM_LAYERS)
    layers = model.base_model.model.model.layers
    for layer in layers[1:]:
        fully_shard(layer, mesh=mesh)
    ignored = {next(p for p in layers[0].parameters() if p.requires_grad)}
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    out["fsdp/ignored_param"] = error_of(lambda: pareto(model))


def sharded_scenario(rank: int, world: int, out: dict) -> None:
    """Flat buffers split like FSDP's flat parameters: contiguous chunks, the last zero-padded."""
    gen = torch.Generator().manual_seed(7)
    sizes = [5, 0, 17, 3, 11, 9]
    total = sum(sizes)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    a = torch.randn(total, generator=gen, dtype=torch.float64)
    b = -0.3 * a + 0.2 * torch.randn(total, generator=gen, dtype=torch.float64)
    chunk = -(-total // world)
    lo = rank * chunk
    a_shard, b_shard = torch.zeros(chunk, dtype=torch.float64), torch.zeros(chunk, dtype=torch.float64)
    n = max(0, min(total, lo + chunk) - lo)
    a_shard[:n], b_shard[:n] = a[lo : lo + n], b[lo : lo + n]
    local = (offsets - lo).clamp(0, chunk)
    local[-1] = chunk  # the zero padding joins the last segment: it adds nothing to the sums
    active = torch.tensor([True, True, False, True, True, True])
    res = sharded_integrate(a_shard, b_shard, local, rule="pareto_lora", tau=0.5, active=active)
    out["sharded/out"], out["sharded/stats"], out["sharded/coeffs"] = res.out[:n].clone(), res.stats, res.coeffs
    segment_group = torch.tensor([0, 0, 1, 1, 2, 2])
    res = sharded_integrate(a_shard, b_shard, local, rule="mgda", segment_group=segment_group,
                            active=torch.tensor([True, False, True]))
    out["sharded/grouped_out"], out["sharded/grouped_stats"] = res.out[:n].clone(), res.stats
    out["sharded/inputs"] = (a, b, offsets, active)
    # Every rule option at the boundary (margin included), and groups that are not runs of segments.
    res = sharded_integrate(a_shard, b_shard, local, rule="pareto_lora", tau=0.5, margin=0.7, active=active)
    out["sharded/margin_out"], out["sharded/margin_cases"] = res.out[:n].clone(), res.cases
    res = sharded_integrate(a_shard, b_shard, local, rule=pareto_lora.RuleSpec("mgda"),
                            segment_group=torch.tensor([1, 0, 1, 0, 2, 2]))
    out["sharded/scattered_out"], out["sharded/scattered_stats"] = res.out[:n].clone(), res.stats


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    out: dict = {}
    ok = False
    try:
        sharded_scenario(rank, world, out)
        ddp_scenarios(rank, out)
        fsdp_scenarios(rank, world, out)
        ok = True
    finally:
        shut_down(ok)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()

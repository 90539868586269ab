"""K = 3 objectives under DDP (the communication hook) and FSDP2: 2 CPU processes, gloo (issue 29).

One pair of processes (_multi_worker.py) runs every scenario; each rank's integrated ``.grad``,
report Gram table and losses are compared here with the single-process ``MultiObjectiveLoRA`` on
the global batch: the losses averaged over the ranks' batches (what DDP and FSDP average), one
backward. Not bitwise: the single process sums the ranks' gradients in another order (float32
rounding), so within rtol 1e-4. The ranks are compared with each other bitwise.
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "archs"))

import arch_models as am  # noqa: E402
import models  # noqa: E402
import pareto_lora  # noqa: E402
from pareto_lora import archs  # noqa: E402

import _multi_worker as W  # noqa: E402
from _launch import free_port, run_ranks  # noqa: E402

WORLD = 2
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("multi")
    port = str(free_port())
    return run_ranks(  # torchrun's environment, nothing else
        os.path.join(HERE, "_multi_worker.py"), WORLD, out_dir, TIMEOUT_S, lambda r: [str(out_dir)],
        lambda r: dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD),
                       LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def averaged(losses_per_rank: list[dict], scale: float = 1.0) -> dict:
    """The global-batch losses: the mean over the ranks' (equal-sized) batches of each objective's loss."""
    return {k: scale * sum(d[k] for d in losses_per_rank) / len(losses_per_rank) for k in losses_per_rank[0]}


def llama_reference(rule: str, windows: list[list[int]], scale: float = 1.0, **kw):
    """(grads, report) of the single-process step on the global batch of every window (micro-batch bases)."""
    model = models.lora_llama(num_layers=W.NUM_LAYERS)
    pl = W.pareto(model, rule, **kw)
    for bases in windows:
        for base in bases:
            pl.accumulate(averaged([W.three_losses(model, W.batch_for(r, base)) for r in range(WORLD)], scale))
        report = pl.integrate_accumulated()
    return W.grads_of(model), report


def assert_ranks_bitwise_equal(ranks, key: str):
    for suffix in ("", "/group_stats", "/losses", "/cases"):
        a, b = ranks[0][key + suffix], ranks[1][key + suffix]
        if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
            diff = [n for n in a if not torch.equal(a[n], b[n])]
            assert a.keys() == b.keys() and not diff, f"{key}: ranks differ in {len(diff)} tensors, e.g. {diff[:3]}"
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f"{key}{suffix}: ranks differ"
        else:
            assert a == b, f"{key}{suffix}: ranks differ: {a} vs {b}"


def assert_matches(got: dict, key: str, grads: dict, report):
    assert_ranks_bitwise_equal(got, key)
    mine = got[0]
    assert mine[key].keys() == grads.keys()
    scale = max(g.abs().max().item() for g in grads.values())
    for n, want in grads.items():
        torch.testing.assert_close(mine[key][n].double(), want.double(), rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{key} {n}: {m}")
    # The report's Gram is that of the averaged gradients (not the mean of the ranks' Grams).
    want = report.group_stats
    torch.testing.assert_close(mine[f"{key}/group_stats"], want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    assert mine[f"{key}/losses"] == pytest.approx(report.losses, rel=1e-6)
    assert mine[f"{key}/cases"] == report.cases


@pytest.mark.parametrize("rule", sorted(W.RULES))
def test_ddp_three_objectives_equal_the_single_process_global_batch(ranks, rule):
    for step in range(2):  # DDP's initial buckets, then the rebuilt ones
        grads, report = llama_reference(rule, [[10 * step]])
        assert_matches(ranks, f"ddp/{rule}/step{step}", grads, report)


def test_ddp_the_gram_is_taken_after_the_average(ranks):
    # What the design rests on: the mean of the ranks' local Grams differs from the Gram of the
    # averaged gradients (so reducing the statistics instead of the gradients would be wrong).
    model = models.lora_llama(num_layers=W.NUM_LAYERS)
    local = []
    for r in range(WORLD):
        pl = W.pareto(model, "mean")
        local.append(pl.backward(W.three_losses(model, W.batch_for(r, 0))).group_stats)
    mean_of_grams = sum(local) / WORLD
    got = ranks[0]["ddp/mean/step0/group_stats"]
    assert not torch.allclose(mean_of_grams, got, rtol=1e-2)


def test_ddp_accumulation_with_and_without_no_sync(ranks):
    grads, report = llama_reference("constant", [[300, 400]], scale=0.5)
    assert_matches(ranks, "ddp/no_sync", grads, report)
    assert_matches(ranks, "ddp/synced", grads, report)


def test_ddp_failures(ranks):
    out = ranks[0]
    assert out["err/unreached"].startswith("ValueError: answer: the loss does not depend on any trainable LoRA")
    assert out["err/unchanged"] and out["err/micro"] == 2
    assert out["err/state_dict"].startswith("RuntimeError: state_dict: under DDP")
    assert out["err/last_in_no_sync"].startswith("RuntimeError: integrate_accumulated: the last backward ran without DDP")
    assert "gradient_as_bucket_view=True" in out["err/bucket_view"]
    assert out["err/static_graph"].startswith("ValueError: model: DistributedDataParallel(static_graph=True) is not supported")
    assert ranks[1]["err/unchanged"]
    assert out["err/hook"].startswith("SyncFailure: backward: ParetoLoRA's DDP communication hook failed")
    assert out["err/hook_micro"] == 0 and out["err/hook_nan"]
    after, step0 = out["ddp/after_failure"], out["ddp/constant/step0"]
    assert all(torch.equal(after[n], step0[n]) for n in step0)  # the same inputs: the same bits



def test_ddp_a_nonfinite_loss_on_one_rank_is_settled_alike_on_every_rank(ranks):
    for out in ranks:
        assert out["nonfinite/raise"].startswith("FloatingPointError: image loss is not finite")
        assert out["nonfinite/raise/micro"] == 0 and out["nonfinite/skip"] == "no error"
        assert out["nonfinite/skip/micro"] == 0 and out["nonfinite/grads_nan"]
        assert set(out["nonfinite/cases"]) == {int(pareto_lora.Case.NONFINITE)}
        assert out["nonfinite/loss_finite"]["image"] == float("inf")


def test_ddp_a_refused_step_leaves_grad_nan_on_every_rank_as_for_two_objectives(ranks):
    # on_nonfinite="raise": .grad held the averaged last objective (finite here); like the two-objective
    # DDP path, a refused step leaves it NaN, so an optimizer step after the caught error cannot apply it.
    for out in ranks:
        assert out["refused/raise"].startswith("FloatingPointError: prompt loss is not finite"), out["refused/raise"]
        assert out["refused/micro"] == 0 and out["refused/grads_nan"]
    assert_ranks_bitwise_equal(ranks, "ddp/after_refusal")
    after, step0 = ranks[0]["ddp/after_refusal"], ranks[0]["ddp/constant/step0"]
    assert all(torch.equal(after[n], step0[n]) for n in step0)  # the next step: the same inputs, the same bits


def test_fsdp2_a_refused_step_is_refused_on_every_rank_and_the_next_is_normal(ranks):
    for out in ranks:
        assert out["fsdp/refused/raise"].startswith("FloatingPointError: prompt loss is not finite")
        assert out["fsdp/refused/micro"] == 0
        assert out["fsdp/refused/grads_nan"]  # not FSDP2's last reduce-scatter: NaN, as under DDP
    assert_ranks_bitwise_equal(ranks, "fsdp/after_refusal")
    after, step = ranks[0]["fsdp/after_refusal"], ranks[0]["fsdp/step"]
    assert all(torch.equal(after[n], step[n]) for n in step)


@pytest.mark.parametrize("sync", ["ddp", "fsdp"])
def test_stats_ema_and_preserve_norm_equal_the_single_process_global_batch(ranks, sync):
    # The rule runs once per step on the global Gram (DDP: of the averaged buffers; FSDP2: the summed shards'),
    # so the running average and the rescaling are those of one process on the global batch; ranks bitwise equal.
    for step in range(2):
        grads, report = llama_reference(W.OPTIONS_RULE, [[0], [10]][: step + 1], **W.OPTIONS)
        assert_matches(ranks, f"options/{sync}/step{step}", grads, report)
    assert torch.equal(ranks[0][f"options/{sync}/ema"], ranks[1][f"options/{sync}/ema"])


@pytest.mark.parametrize("order", sorted(W.JANUS_ORDERS))
def test_janus_three_objective_step_through_ddp(ranks, order):
    # issue 29: a 3-objective Janus LoRA step runs end to end through 2-process gloo DDP (two steps).
    # "text_last": the objective whose backward drives DDP's reduction never reaches the projector
    # (also with find_unused_parameters=True, the Trainer's default for PEFT models).
    objectives = W.JANUS_ORDERS[order][0]
    torch.manual_seed(0)
    model = am.lora(am.MODELS["janus"]())
    pl = pareto_lora.ParetoLoRA(model, rule="constant", weights=(0.5, 2.0, 1.5), arch="auto", num_groups=2,
                                modulate=("lower", "generation"), objectives=objectives, backend="reference")
    for step in range(2):
        report = pl.backward(averaged([archs.objective_losses_for(model, W.janus_batch(r, step), pl.arch)
                                       for r in range(WORLD)]))
        assert_matches(ranks, f"janus/{order}/step{step}", W.grads_of(model), report)
        assert report.groups["generation"]["case"] == pareto_lora.Case.WEIGHTED
        assert report.groups["projector"]["norm"]["text"] == 0 < report.groups["projector"]["norm"]["understanding"]


def test_janus_three_objective_step_through_fsdp2(ranks):
    # the same step as "text_first" under DDP, on an FSDP2-sharded Janus (its input embeddings sharded
    # outside the root's forward: objective_losses_for computes them inside it)
    torch.manual_seed(0)
    model = am.lora(am.MODELS["janus"]())
    pl = pareto_lora.ParetoLoRA(model, rule="constant", weights=(0.5, 2.0, 1.5), arch="auto", num_groups=2,
                                modulate=("lower", "generation"), objectives=archs.OBJECTIVES, backend="reference")
    report = pl.backward(averaged([archs.objective_losses_for(model, W.janus_batch(r, 0), pl.arch) for r in range(WORLD)]))
    assert_matches(ranks, "janus/fsdp/step0", W.grads_of(model), report)


def test_fsdp2_three_objectives_equal_the_single_process_global_batch(ranks):
    grads, report = llama_reference("constant", [[0]])
    assert_matches(ranks, "fsdp/step", grads, report)
    grads, report = llama_reference("constant", [[300, 400]], scale=0.5)
    assert_matches(ranks, "fsdp/accum", grads, report)  # the failed micro-batch in between changed nothing
    assert ranks[0]["fsdp/err/unreached"].startswith("RuntimeError: backward: the answer loss produced no sharded")
    assert ranks[0]["fsdp/err/grad_kept"] and ranks[1]["fsdp/err/grad_kept"]


def test_trainer_three_objectives_under_ddp_equal_one_large_batch(ranks):
    # ParetoLoRATrainer under torchrun: GA 2 (no_sync, then synchronised), 2 ranks x 2 x 2 examples; the
    # window's per-objective counts summed over the ranks make the step the 8 examples at once.
    assert ranks[0]["trainer/bound_to_wrapper"] and ranks[1]["trainer/bound_to_wrapper"]
    a, b = ranks[0]["trainer/grads"], ranks[1]["trainer/grads"]
    assert all(torch.equal(a[n], b[n]) for n in a) and torch.equal(ranks[0]["trainer/group_stats"],
                                                                   ranks[1]["trainer/group_stats"])
    torch.manual_seed(0)
    model = am.lora(am.MODELS["janus"]())
    whole = {k: torch.stack([W.janus_example(i)[k] for i in range(8)]) for k in W.janus_example(0)}
    pl = pareto_lora.ParetoLoRA(model, arch="auto", num_groups=2, modulate="all", objectives=archs.OBJECTIVES,
                                rule="constant", weights=(1.0, 0.5, 2.0), backend="reference")
    report = pl.backward(archs.objective_losses_for(model, whole, pl.arch))
    scale = max(g.abs().max().item() for g in a.values())
    for n, want in W.grads_of(model).items():
        torch.testing.assert_close(a[n], want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")
    assert ranks[0]["trainer/losses"] == pytest.approx(report.losses, rel=1e-5)

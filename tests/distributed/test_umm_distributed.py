"""Unified multimodal models under DDP and the Trainer under torchrun: 2 CPU processes, gloo.

One pair of processes (_umm_worker.py), launched with a torchrun-like environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), runs:

* ``ParetoLoRATrainer`` (TrainingArguments(use_cpu=True, ddp_backend="gloo"), GA=2, one step)
  on Chameleon with ``arch="auto"`` and on the Llama labels + image_token_mask path: the Trainer
  wraps the model in DDP inside ``train()`` and ParetoLoRA must bind to that wrapper;
* the three lines on a DDP-wrapped Chameleon (two steps: DDP's initial and rebuilt buckets), and
  on Janus with ``find_unused_parameters=True``;
* the three lines on FSDP2-sharded Chameleon, Emu3, Janus and LLaVA, the losses from ``archs.modality_losses_for``.

Each is compared with the single-process result on the global batch (all ranks' examples at
once): plain autograd + ``pareto_lora.reference.integrate`` per group, and the ranks bitwise with
each other.
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
from arch_reference import oracle, plain_grads, spec_group  # noqa: E402
from pareto_lora import Case, archs  # noqa: E402
from pareto_lora.flat import build_layout, group_of_names  # noqa: E402

import _umm_worker as W  # noqa: E402
from _launch import free_port, run_ranks  # noqa: E402

WORLD = 2
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("umm")
    port = str(free_port())
    worker = os.path.join(HERE, "_umm_worker.py")
    return run_ranks(  # torchrun's environment, nothing else
        worker, WORLD, out_dir, TIMEOUT_S, lambda r: [str(out_dir)],
        lambda r: dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD),
                       LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def concat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def assert_bitwise_same(ranks, key):
    a, b = ranks[0][key], ranks[1][key]
    assert a.keys() == b.keys()
    diff = [n for n in a if not torch.equal(a[n], b[n])]
    assert not diff, f"{key}: ranks differ in {len(diff)} tensors, e.g. {diff[:3]}"


def assert_matches(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    scale = max(r.abs().max().item() for r in ref.values())
    for n in ref:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


def arch_reference(name: str, batch: dict, rule: str = "pareto_lora", exclude_frozen: bool = False):
    """(integrated grads, global losses) of the three lines on `batch` in one process, every group modulated
    (``exclude_frozen``: no LoRA in the frozen VQ model, as the FSDP2 scenario builds it)."""
    base = am.MODELS[name]()
    model = am.lora(base, exclude_modules=archs.detect_arch(base).lora_exclude_modules if exclude_frozen else None)
    spec = archs.detect_arch(model)
    grads = plain_grads(model, batch, spec)
    groups = {n: spec_group(spec, n, W.NUM_GROUPS) for n in grads}
    lt, li = archs.modality_losses_for(model, batch, spec)
    return oracle(grads, groups, set(groups.values()), rule), (lt.item(), li.item())


def llama_reference(batch: dict):
    model = models.lora_llama(num_layers=4)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = model(**models.model_inputs(batch))
    lt, li = pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])
    gt = torch.autograd.grad(lt, [p for _, p in named], retain_graph=True)
    gi = torch.autograd.grad(li, [p for _, p in named])
    grads = {n: (a, b) for (n, _), a, b in zip(named, gt, gi)}
    groups = group_of_names(build_layout(model, num_groups=W.NUM_GROUPS, modulate="all"))
    return oracle(grads, groups, set(groups.values()), "pareto_lora"), (lt.item(), li.item())


# ---- the Trainer, launched like torchrun ---------------------------------------------------------
@pytest.mark.parametrize("key", ["trainer/chameleon", "trainer/llama"])
def test_trainer_binds_paretolora_to_its_ddp_wrapper(ranks, key):
    for r in ranks:
        assert r[f"{key}/world_before_train"] == WORLD
        assert r[f"{key}/bound_to_wrapper"]  # ParetoLoRA was rebuilt on trainer.model_wrapped (DDP) ...
        assert r[f"{key}/hook_ran"]  # ... and its communication hook is the one DDP ran
        assert r[f"{key}/find_unused"]  # the Trainer's default for a PEFT model
        assert len(r[f"{key}/inputs"]) == W.TRAIN["gradient_accumulation_steps"]


@pytest.mark.parametrize("key", ["trainer/chameleon", "trainer/llama"])
def test_trainer_step_equals_one_process_on_the_global_window(ranks, key):
    assert_bitwise_same(ranks, f"{key}/grads")
    window = concat([b for r in ranks for b in r[f"{key}/inputs"]])  # every rank's micro-batches
    assert window["input_ids"].shape[0] == WORLD * 2 * 2 and len({tuple(x.tolist()) for x in window["input_ids"]}) == 8
    ref, losses = arch_reference("chameleon", window) if key == "trainer/chameleon" else llama_reference(window)
    assert_matches(ranks[0][f"{key}/grads"], ref)
    for r in ranks:  # global token means, whatever each rank's own counts
        assert r[f"{key}/report_losses"] == pytest.approx(losses, rel=1e-5)
        assert r[f"{key}/logged_loss"][0] == pytest.approx(sum(losses), rel=1e-4)


def test_trainer_llama_ranks_had_different_token_counts(ranks):
    # what makes the global-count normalisation matter (equal counts would hide it)
    counts = [sum(b["image_token_mask"].sum().item() for b in r["trainer/llama/inputs"]) for r in ranks]
    assert counts[0] != counts[1]


# ---- the three lines on a DDP-wrapped model ------------------------------------------------------
@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
@pytest.mark.parametrize("key, name", [("ddp/chameleon", "chameleon"), ("ddp/janus_unused", "janus")])
def test_ddp_three_lines_equal_one_process_on_the_global_batch(ranks, key, name, step):
    k = f"{key}/step{step}"
    assert_bitwise_same(ranks, k)
    batch = concat([am.BATCHES[name](seed=1000 + 10 * step + r) for r in range(WORLD)])
    ref, losses = arch_reference(name, batch)
    assert_matches(ranks[0][k], ref)
    for r in ranks:
        assert r[f"{k}/losses"] == pytest.approx(losses, rel=1e-5)
    assert any(c in (Case.RESCALED, Case.PARETO) for c in ranks[0][f"{k}/cases"])
    if step == 1:  # rebuilt buckets: the groups were integrated across several of them
        assert ranks[0][f"{k}/buckets"] > 2


# ---- the three lines on an FSDP2-sharded model ---------------------------------------------------
@pytest.mark.parametrize("name", am.ARCHS)
def test_fsdp2_three_lines_equal_one_process_on_the_global_batch(ranks, name):
    key = f"fsdp/{name}"
    assert_bitwise_same(ranks, key)
    batch = concat([am.BATCHES[name](seed=2000 + r) for r in range(WORLD)])
    ref, losses = arch_reference(name, batch, exclude_frozen=True)
    assert_matches(ranks[0][key], ref)
    # each rank reports the losses of its own batch; their mean is the global batch's loss (equal sizes)
    mean = [sum(r[f"{key}/losses"][i] for r in ranks) / WORLD for i in range(2)]
    assert mean == pytest.approx(losses, rel=1e-5)
    assert any(c in (Case.RESCALED, Case.PARETO) for c in ranks[0][f"{key}/cases"])

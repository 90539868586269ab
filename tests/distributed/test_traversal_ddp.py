"""Issue 26 under DDP: with non-reentrant activation checkpointing ParetoLoRA keeps two passes (the
image one an ordinary backward, so DDP's communication hook reduces it), refuses a batched
traversal, and every rank ends with the integrated gradient of the global batch, bitwise alike.
2 CPU processes, gloo on loopback (tests/distributed/_traversal_worker.py)."""

import os

import pytest
import torch

from pareto_lora.flat import build_layout, group_of_names

import _dist_worker as W
import _traversal_worker as TW
from _launch import free_port, run_ranks
from test_distributed import WORLD, assert_bitwise_same, assert_matches, concat, integrated, objective_grads


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("traversal_ddp")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(__file__), "_traversal_worker.py")
    return run_ranks(worker, WORLD, out_dir, 240, lambda r: [str(r), str(WORLD), str(port), str(out_dir)],
                     lambda r: env)


@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
def test_ddp_with_checkpointing_matches_the_global_batch(ranks, step):
    torch.set_num_threads(1)
    model = TW.checkpointed_model()
    groups = group_of_names(build_layout(model, num_groups=W.NUM_GROUPS, modulate="all"))
    key = f"step{step}"
    assert_bitwise_same(ranks, key)
    batch = concat([W.batch_for(r, 100 * step) for r in range(WORLD)])
    assert_matches(ranks[0][key], integrated(objective_grads(model, [batch], [1.0]), groups, "pareto_lora"))


def test_ddp_refuses_a_batched_traversal(ranks):
    assert all(r["batched_error"].startswith("traversal: expected 'auto' or 'two_pass' under DDP or FSDP2")
               for r in ranks)

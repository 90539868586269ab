"""Issue 26 under DDP and FSDP2 with non-reentrant activation checkpointing (2 CPU processes, gloo on
loopback, tests/distributed/_traversal_worker.py).

DDP: ``traversal="auto"`` takes one batched backward (a checkpointed segment is recomputed once)
and hands the image gradient to DDP's hook by a replay from the parameters. Every rank ends
with the integrated gradient of the global batch, bitwise alike, and bitwise equal to the
two-pass DDP step wherever one process's batched backward is bitwise equal to its two passes
(else within the global-batch tolerance): on small buckets that groups span and on one bucket,
initial and rebuilt, with ``find_unused_parameters=True``, over two accumulated micro-batches
(inside ``no_sync()`` or not) and through a GradScaler. FSDP2 likewise: ``"auto"`` takes the
batched traversal (reduce-scattered outside FSDP2), equal to its two passes and to the global batch;
refused under a MixedPrecisionPolicy. K = 3 objectives under DDP take the batched traversal too.
"""

import os
import re

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
    return run_ranks(worker, WORLD, out_dir, 300, lambda r: [str(r), str(WORLD), str(port), str(out_dir)],
                     lambda r: env)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return TW.checkpointed_model()


@pytest.fixture(scope="module")
def groups(model):
    return group_of_names(build_layout(model, num_groups=W.NUM_GROUPS, modulate="all"))


def reference(model, groups, bases, weight=1.0):
    batches = [W.batch_for(r, base) for base in bases for r in range(WORLD)]
    if len(bases) == 1:
        return integrated(objective_grads(model, [concat(batches)], [1.0]), groups, "pareto_lora")
    return integrated(objective_grads(model, batches, [1.0 / len(batches)] * len(batches)), groups, "pareto_lora")


def assert_as_two_passes(ranks, key_two_pass, key_auto):
    """Ranks bitwise alike; the one-traversal result bitwise the two-pass one where one process's is."""
    assert_bitwise_same(ranks, key_two_pass)
    assert_bitwise_same(ranks, key_auto)
    if all(r["local/bitwise"] for r in ranks):
        got, want = ranks[0][key_auto], ranks[0][key_two_pass]
        diff = [n for n in want if not torch.equal(got[n], want[n])]
        assert not diff, f"{key_auto}: differs from two passes in {len(diff)} tensors, e.g. {diff[:3]}"


@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
@pytest.mark.parametrize("layout", ["small", "one"], ids=["groups-span-buckets", "one-bucket"])
def test_ddp_one_traversal_under_checkpointing(ranks, model, groups, layout, step):
    prefix = f"{layout}/{{}}/step{step}"
    two, auto = prefix.format("two_pass"), prefix.format("auto")
    for r in ranks:
        assert r[f"{two}/taken"] == "two_pass" and r[f"{auto}/taken"] == "batched"
        # the layout claimed: DDP's first step has one bucket of up to 1 MiB (all of this model),
        # its rebuilt small buckets split the groups
        assert all(all(r[f"{k}/whole"]) == (layout == "one" or step == 0) for k in (two, auto))
    assert_as_two_passes(ranks, two, auto)
    assert ranks[0][f"{auto}/cases"] == ranks[0][f"{two}/cases"]
    assert_matches(ranks[0][auto], reference(model, groups, [100 * step]))


@pytest.mark.parametrize("step", [0, 1])
def test_ddp_one_traversal_with_find_unused_parameters(ranks, model, groups, step):
    two, auto = f"unused/two_pass/step{step}", f"unused/auto/step{step}"
    assert all(r[f"{auto}/taken"] == "batched" for r in ranks)  # DDP's _DDPSink passes a batch through
    assert_as_two_passes(ranks, two, auto)
    assert_matches(ranks[0][auto], reference(model, groups, [100 * step]))


@pytest.mark.parametrize("synced", [False, True], ids=["no_sync-then-sync", "both-synchronised"])
def test_ddp_one_traversal_accumulates(ranks, model, groups, synced):
    key = f"accum{'_synced' if synced else ''}/{{}}"
    assert all(r[f"{key.format('auto')}/taken"] == "batched" for r in ranks)
    assert_as_two_passes(ranks, key.format("two_pass"), key.format("auto"))
    assert_matches(ranks[0][key.format("auto")], reference(model, groups, [300, 400]))


def test_ddp_one_traversal_with_a_grad_scaler(ranks, model, groups):
    assert_as_two_passes(ranks, "scaler/two_pass", "scaler/auto")
    unscaled = {n: g / 1024.0 for n, g in ranks[0]["scaler/auto"].items()}  # exact: a power of two
    assert_matches(unscaled, reference(model, groups, [0]))


def test_ddp_refusals(ranks):
    for r in ranks:
        assert re.match(r"ValueError: traversal: expected 'auto', 'two_pass', 'batched' under DDP, got 'sum_first'",
                        r["err/sum_first"]), r["err/sum_first"]
        assert re.match(r"ValueError: model: DistributedDataParallel\(static_graph=True\) is not supported",
                        r["err/static_graph"]), r["err/static_graph"]


@pytest.mark.parametrize("key", ["step0", "step1", "accum"])
def test_ddp_k_objectives_one_traversal(ranks, key):
    """K = 3 under DDP with checkpointing: one batched traversal, the last objective replayed into
    DDP's hook; ranks bitwise alike, and bitwise K passes where one process's batched backward is."""
    two, auto = f"k/two_pass/{key}", f"k/auto/{key}"
    if key != "accum":
        assert all(r[f"{auto}/taken"] == "batched" and r[f"{two}/taken"] == "two_pass" for r in ranks)
    assert_bitwise_same(ranks, two)
    assert_bitwise_same(ranks, auto)
    if all(r["k/local/bitwise"] for r in ranks):
        assert all(torch.equal(ranks[0][auto][n], g) for n, g in ranks[0][two].items())
    else:
        assert_matches(ranks[0][auto], {n: g.double() for n, g in ranks[0][two].items()})


@pytest.mark.parametrize("step", [0, 1])
def test_fsdp2_one_traversal_under_checkpointing(ranks, model, groups, step):
    two, auto = f"fsdp/two_pass/step{step}", f"fsdp/auto/step{step}"
    for r in ranks:
        assert r[f"{two}/checkpointed"] and r[f"{auto}/checkpointed"]
        assert r[f"{two}/taken"] == "two_pass" and r[f"{auto}/taken"] == "batched"
    assert_as_two_passes(ranks, two, auto)
    for key in (two, auto):
        assert torch.equal(ranks[0][f"{key}/coeffs"], ranks[1][f"{key}/coeffs"])
        assert_matches(ranks[0][key], reference(model, groups, [100 * step]))


def test_fsdp2_one_traversal_accumulates(ranks, model, groups):
    assert_as_two_passes(ranks, "fsdp/two_pass/accum", "fsdp/auto/accum")
    assert_matches(ranks[0]["fsdp/auto/accum"], reference(model, groups, [300, 400]))


@pytest.mark.parametrize("r", [3, 1])
def test_fsdp2_one_traversal_with_uneven_shards(ranks, r):
    """lora_A's rows do not divide evenly (r = 3: 2 + 1 rows; r = 1: 1 + 0, an empty shard)."""
    assert [ranks[k][f"fsdp/r{r}/auto/rows"]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
            for k in range(WORLD)] == ([(2, 32), (1, 32)] if r == 3 else [(1, 32), (0, 32)])
    assert all(x[f"fsdp/r{r}/auto/taken"] == "batched" for x in ranks)
    assert_bitwise_same(ranks, f"fsdp/r{r}/auto")
    want = {n: g.double() for n, g in ranks[0][f"fsdp/r{r}/two_pass"].items()}
    assert_matches(ranks[0][f"fsdp/r{r}/auto"], want)


def test_fsdp2_refusals(ranks):
    for r in ranks:
        assert re.match(r"ValueError: traversal: expected 'auto', 'two_pass', 'batched' under FSDP2, got 'sum_first'",
                        r["err/fsdp/sum_first"]), r["err/fsdp/sum_first"]
        # refused before anything runs: no backward, no collective (the other rank is not left waiting)
        assert re.match(r"ValueError: traversal: 'batched' under FSDP2 expected FSDP2's default reduction, got a "
                        r"MixedPrecisionPolicy", r["err/fsdp/mixed_precision"]), r["err/fsdp/mixed_precision"]
        assert r["fsdp/mixed_precision/untouched"]
        assert re.match(r"ValueError: traversal: expected 'auto' or 'two_pass' with K objectives under FSDP2, got "
                        r"'batched'", r["err/fsdp/k_batched"]), r["err/fsdp/k_batched"]


def test_unsharded_capture_leaves_is_a_typed_result():
    # One process, no FSDP2: plain parameters are not dim-0 shards, so the capture says what it expected.
    from pareto_lora.distributed.fsdp_traversal import Leaves, UnshardedCapture

    model = torch.nn.Linear(3, 2)
    params = list(model.parameters())
    capture = UnshardedCapture(model, params)
    found = capture.leaves(params)
    assert isinstance(found, Leaves) and found.tensors is None
    assert found.expected.startswith("parameters sharded on dim 0 over a 1-D mesh, got Parameter")
    for h in capture.handles:
        h.remove()
    assert Leaves(params).tensors == params and Leaves(params).expected == ""
    for bad in ((None, ""), (params, "a forward")):
        with pytest.raises(ValueError, match="Leaves: expected either the tensors or what was expected"):
            Leaves(*bad)


def test_fsdp2_batched_without_a_forward_since_creation_is_refused_by_name(ranks):
    # The capture saw no forward (the losses come from one before ParetoLoRA existed): refused, nothing run.
    for r in ranks:
        assert re.match(r"ValueError: traversal: 'batched' under FSDP2 expected a forward of this model since "
                        r"ParetoLoRA was created", r["err/fsdp/no_forward"]), r["err/fsdp/no_forward"]
        assert r["fsdp/no_forward/untouched"]

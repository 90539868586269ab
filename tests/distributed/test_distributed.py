"""ParetoLoRA under DDP and FSDP2, and sharded_integrate: 2 CPU processes, gloo on loopback.

One pair of worker processes (tests/_dist_worker.py) runs every scenario; the tests here compare
what the ranks saved with each other (bitwise) and with single-process references computed from
plain autograd and ``pareto_lora.reference``.

Global-batch reference: DDP and FSDP average the ranks' gradients, i.e. they differentiate the
average of the per-rank losses. With equal token counts per rank that is the loss of the
concatenated batch; when one rank has no image tokens it is not (the image loss is the other
rank's mean halved), so that test uses the average of per-rank losses explicitly.
"""

import os
import re

import pytest
import torch

import pareto_lora
from pareto_lora import Case
from pareto_lora.flat import build_layout, group_of_names

import _dist_worker as W
from _launch import free_port, run_ranks
import models

WORLD = 2
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
    return run_ranks(worker, WORLD, out_dir, TIMEOUT_S, lambda r: [str(r), str(WORLD), str(port), str(out_dir)],
                     lambda r: env)


# ---- single-process references ----------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The references are tiny; intra-op threads only contend with the loaded CI cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return models.lora_llama(num_layers=W.NUM_LAYERS)


@pytest.fixture(scope="module")
def groups(model):
    return group_of_names(build_layout(model, num_groups=W.NUM_GROUPS, modulate="all"))


def objective_grads(model, batches, weights):
    """name -> (g_text, g_image) of sum_i weights[i] * loss(batches[i]), float64."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: [torch.zeros(p.shape, dtype=torch.float64)] * 2 for n, p in named}
    for batch, w in zip(batches, weights):
        lt, li = W.losses_of(model, batch)
        gt = torch.autograd.grad(lt, [p for _, p in named], retain_graph=True)
        gi = torch.autograd.grad(li, [p for _, p in named])
        for (n, _), a, b in zip(named, gt, gi):
            total[n] = [total[n][0] + w * a.double(), total[n][1] + w * b.double()]
    return total


def concat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def integrated(grads, groups, rule):
    """Reference rule applied per group (every group modulated) to whole-group gradients."""
    out = {}
    for g in sorted(set(groups.values())):
        names = [n for n in grads if groups[n] == g]
        a = torch.cat([grads[n][0].reshape(-1) for n in names])
        b = torch.cat([grads[n][1].reshape(-1) for n in names])
        res, _, _, _ = pareto_lora.integrate(a, b, torch.tensor([0, a.numel()]), rule=rule, tau=0.5, backend="reference")
        for n, piece in zip(names, res.split([grads[n][0].numel() for n in names])):
            out[n] = piece.view_as(grads[n][0])
    return out


def assert_matches(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    scale = max(r.abs().max().item() for r in ref.values())
    for n in ref:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


def assert_bitwise_same(ranks, key):
    a, b = ranks[0][key], ranks[1][key]
    assert a.keys() == b.keys()
    diff = [n for n in a if not torch.equal(a[n], b[n])]
    assert not diff, f"{key}: ranks differ in {len(diff)} tensors, e.g. {diff[:3]}"


# ---- DDP --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", W.RULES)
@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
def test_ddp_matches_global_batch(ranks, model, groups, rule, step):
    key = f"ddp/{rule}/step{step}"
    assert_bitwise_same(ranks, key)
    batch = concat([W.batch_for(r, 100 * step) for r in range(WORLD)])
    ref = integrated(objective_grads(model, [batch], [1.0]), groups, rule)
    assert_matches(ranks[0][key], ref)
    # the rule did something (the comparison would also pass for plain sums if it did not)
    assert any(c in (Case.RESCALED, Case.PARETO, Case.WEIGHTED) for c in ranks[0][f"{key}/cases"])
    # reported losses are the global (rank-averaged) ones
    lt, li = W.losses_of(model, batch)
    assert ranks[0][f"{key}/losses"] == pytest.approx((lt.item(), li.item()), rel=1e-5)


def test_ddp_groups_span_buckets(ranks, groups):
    buckets = ranks[0]["ddp/pareto_lora/buckets"]
    spans = {g: sum(any(groups[n] == g for n in b) for b in buckets) for g in set(groups.values())}
    assert max(spans.values()) >= 2, spans


def test_naive_second_backward_diverges_across_ranks(ranks):
    """The trap this module exists for: DDP reduces the first backward after a forward only."""
    assert_bitwise_same(ranks, "naive/text")
    img0, img1 = ranks[0]["naive/image"], ranks[1]["naive/image"]
    assert any(not torch.allclose(img0[n], img1[n]) for n in img0)


def test_ddp_rank_without_image_tokens(ranks, model, groups):
    assert_bitwise_same(ranks, "noimage")
    batches = [W.batch_for(r, 200, image=r == 0) for r in range(WORLD)]
    assert not batches[1]["image_token_mask"].any()
    ref = integrated(objective_grads(model, batches, [1.0 / WORLD] * WORLD), groups, "pareto_lora")
    assert_matches(ranks[0]["noimage"], ref)
    li0 = W.losses_of(model, batches[0])[1].item()
    assert ranks[1]["noimage/losses"][1] == pytest.approx(li0 / WORLD, rel=1e-5)


def test_ddp_no_sync_accumulation(ranks, model, groups):
    assert_bitwise_same(ranks, "accum")
    batches = [W.batch_for(r, base) for base in (300, 400) for r in range(WORLD)]
    ref = integrated(objective_grads(model, batches, [1.0 / len(batches)] * len(batches)), groups, "pareto_lora")
    assert_matches(ranks[0]["accum"], ref)


@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
def test_ddp_integrates_inside_hook(ranks, model, groups, step):
    """.grad holds the integrated gradient as soon as the backward returns; integrate_accumulated() only reports."""
    key = f"hook/step{step}"
    assert_bitwise_same(ranks, key)
    batch = concat([W.batch_for(r, 100 * step) for r in range(WORLD)])
    assert_matches(ranks[0][key], integrated(objective_grads(model, [batch], [1.0]), groups, "pareto_lora"))
    num_groups = len(set(groups.values()))
    for r in ranks:
        assert r[f"{key}/unchanged"]
        trace = r[f"{key}/trace"]
        completed = [g for _, gs, _ in trace for g in gs]
        assert sorted(completed) == list(range(num_groups))  # each group's rule ran exactly once
        assert sum(n for _, _, n in trace) == len(trace)  # every bucket was integrated exactly once
    assert {k for k, _, _ in ranks[0][f"{key}/trace"]} <= set(ranks[0]["hook/bucket_keys"])


@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
def test_ddp_whole_bucket_matches_global_batch(ranks, model, groups, step):
    """All LoRA gradients in one DDP bucket: every group is whole in it (one launch integrates it,
    before and after DDP re-buckets); ranks bitwise equal, and the global-batch result."""
    key = f"whole/step{step}"
    assert all(ranks[0]["whole/plans"])
    assert_bitwise_same(ranks, key)
    batch = concat([W.batch_for(r, 100 * step) for r in range(WORLD)])
    assert_matches(ranks[0][key], integrated(objective_grads(model, [batch], [1.0]), groups, "pareto_lora"))
    for r in ranks:
        assert [gs for _, gs, _ in r[f"{key}/trace"]] == [tuple(range(len(set(groups.values()))))]


@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
def test_ddp_whole_bucket_is_one_fused_launch(ranks, step):
    """A trace (every thread: the hook runs on the process group's) of one DDP step on each rank
    shows one pareto_lora::integrate and no separate statistics, rule or combine."""
    for r in ranks:
        assert r[f"whole/step{step}/ops"] == ["pareto_lora::integrate"], r[f"whole/step{step}/ops"]


@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
def test_ddp_python_rule_matches_one_process(ranks, step):
    """preserve_norm under DDP (statistics, the rule in Python, combine) equals one process's step on
    the global batch; ranks bitwise equal."""
    key = f"python_rule/step{step}"
    assert_bitwise_same(ranks, key)
    model = models.lora_llama(num_layers=W.NUM_LAYERS)
    pl = W.pareto(model, preserve_norm=True)
    pl.backward(*W.losses_of(model, concat([W.batch_for(r, 100 * step) for r in range(WORLD)])))
    want = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
    assert_matches(ranks[0][key], want)


def test_one_bucket_cap_mb():
    model = models.lora_llama(num_layers=W.NUM_LAYERS)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    cap = pareto_lora.distributed.one_bucket_cap_mb(model)
    assert nbytes / 2**20 < cap < 2 * nbytes / 2**20 + 0.02
    with pytest.raises(ValueError, match="model: expected the module to wrap"):
        pareto_lora.distributed.one_bucket_cap_mb("model")


def test_ddp_hook_overlaps_backward(ranks):
    """On the rebuilt (small) buckets a group finishes, and its buckets are integrated, while others
    are still being reduced. (DDP's first step uses one bucket: it buckets by size only from step 2.)"""
    for r in ranks:
        trace = r["hook/step1/trace"]
        assert len(trace) > 2, trace
        first = next(i for i, (_, gs, _) in enumerate(trace) if gs)
        assert first < len(trace) - 1, trace
        assert any(n for _, _, n in trace[:-1]), trace


@pytest.mark.parametrize("step", [0, 1], ids=["initial-buckets", "rebuilt-buckets"])
def test_ddp_bucket_order_does_not_matter(ranks, model, groups, step):
    """Rank 1 processes its reductions in reverse order: statistics and gradients stay bitwise equal."""
    key = f"reversed/step{step}"
    if step == 1:
        order0, order1 = ranks[0][f"{key}/order"], ranks[1][f"{key}/order"]
        assert sorted(order0) == sorted(order1) and order0 != order1
    assert_bitwise_same(ranks, key)
    assert torch.equal(ranks[0][f"{key}/stats"], ranks[1][f"{key}/stats"])
    batch = concat([W.batch_for(r, 100 * step) for r in range(WORLD)])
    assert_matches(ranks[0][key], integrated(objective_grads(model, [batch], [1.0]), groups, "pareto_lora"))


def test_ddp_synchronised_accumulation(ranks, model, groups):
    """Every micro-batch synchronised: the next micro-batch continues from the un-integrated averages."""
    assert_bitwise_same(ranks, "accum_synced")
    batches = [W.batch_for(r, base) for base in (300, 400) for r in range(WORLD)]
    ref = integrated(objective_grads(model, batches, [1.0 / len(batches)] * len(batches)), groups, "pareto_lora")
    assert_matches(ranks[0]["accum_synced"], ref)


def test_ddp_nonfinite_loss_on_one_rank(ranks):
    """The loss is known only after the hook integrated: .grad is poisoned after the fact, on every rank."""
    for r in ranks:
        assert set(r["nonfinite/skip/cases"]) == {Case.NONFINITE}
        assert r["nonfinite/skip/all_nan"]
        assert re.match(r"FloatingPointError: image loss is not finite", r["nonfinite/raise"]), r["nonfinite/raise"]
        assert r["nonfinite/raise/all_nan"]


def test_ddp_hook_failure_raises_instead_of_hanging(ranks):
    for r in ranks:
        assert re.match(r"SyncFailure: backward: .*hook failed: ValueError: rule exploded", r["err/hook_failure"]), \
            r["err/hook_failure"]
        assert r["err/hook_failure/all_nan"]
        assert r["err/after_failure"] == "no error"


@pytest.mark.parametrize(
    "key, expected",
    [
        ("err/second_hook", r"ValueError: model: .*already has a communication hook"),
        ("err/unsynced", r"RuntimeError: integrate_accumulated: .*without DDP gradient synchronisation"),
        ("err/bucket_view", r"ValueError: model: .*gradient_as_bucket_view=True"),
        ("err/ignored_param", r"ValueError: model: DDP ignores trainable parameters ParetoLoRA integrates"),
    ],
)
def test_ddp_refusals(ranks, key, expected):
    for r in ranks:
        assert re.match(expected, r[key]), r[key]


# ---- FSDP2 and the sharded building block -----------------------------------------------------
@pytest.mark.parametrize("rule", W.RULES)
def test_fsdp2_matches_global_batch(ranks, model, groups, rule):
    if not ranks[0]["fsdp/available"]:
        pytest.fail("torch.distributed.fsdp.fully_shard is not importable in this torch")
    key = f"fsdp/{rule}"
    assert torch.equal(ranks[0][f"{key}/coeffs"], ranks[1][f"{key}/coeffs"])
    batch = concat([W.batch_for(r, 0) for r in range(WORLD)])
    ref = integrated(objective_grads(model, [batch], [1.0]), groups, rule)
    for r in ranks:
        assert_matches(r[key], ref)
    lt, li = W.losses_of(model, batch)
    assert ranks[1][f"{key}/losses"] == pytest.approx((lt.item(), li.item()), rel=1e-5)


def test_fsdp2_model_helper_losses(ranks, model, groups):
    # archs.modality_losses_for runs the FSDP2 root's forward (it failed on the sharded embedding before)
    batch = concat([W.batch_for(r, 0) for r in range(WORLD)])
    ref = integrated(objective_grads(model, [batch], [1.0]), groups, "pareto_lora")
    for r in ranks:
        assert_matches(r["fsdp/archs"], ref)
    lt, li = W.losses_of(model, batch)
    assert ranks[1]["fsdp/archs/losses"] == pytest.approx((lt.item(), li.item()), rel=1e-5)


def test_fsdp2_partly_sharded_model_is_refused(ranks):
    for r in ranks:
        assert r["fsdp/no_root"].startswith("ValueError: model: expected fully_shard(model) on the root too"), r["fsdp/no_root"]
        assert r["fsdp/ignored_param"].startswith(
            "ValueError: model: expected every trainable parameter to be a DTensor"), r["fsdp/ignored_param"]


def test_fsdp2_accumulation(ranks, model, groups):
    batches = [W.batch_for(r, base) for base in (300, 400) for r in range(WORLD)]
    ref = integrated(objective_grads(model, batches, [1.0 / len(batches)] * len(batches)), groups, "pareto_lora")
    assert_matches(ranks[0]["fsdp/accum"], ref)


def test_fsdp2_refused_step_leaves_grad_nan_on_every_rank(ranks):
    # As under DDP: .grad held a gradient the step did not integrate (FSDP2's last reduce-scatter); an
    # optimizer step after the caught FloatingPointError must not apply it. The next step is the normal one.
    for r in ranks:
        assert r["fsdp/refused"].startswith("FloatingPointError: image loss is not finite"), r["fsdp/refused"]
        assert r["fsdp/refused/micro"] == 0
        assert r["fsdp/refused/grads"] and all(bool(g.isnan().all()) for g in r["fsdp/refused/grads"].values())
        assert all(torch.equal(r["fsdp/after_refusal"][n], g) for n, g in ranks[0]["fsdp/pareto_lora"].items())


def test_sharded_integrate_matches_unsharded(ranks):
    a, b, offsets, active = ranks[0]["sharded/inputs"]
    want, stats, coeffs, _ = pareto_lora.integrate(a, b, offsets, rule="pareto_lora", tau=0.5, active=active, backend="reference")
    got = torch.cat([r["sharded/out"] for r in ranks])
    torch.testing.assert_close(got, want)
    for r in ranks:  # the compiled op returns float32 statistics for any input dtype
        torch.testing.assert_close(r["sharded/stats"].double(), stats, rtol=1e-6, atol=1e-6)
        assert torch.equal(r["sharded/coeffs"], ranks[0]["sharded/coeffs"])
    assert torch.equal(ranks[0]["sharded/stats"], ranks[1]["sharded/stats"])


def test_sharded_integrate_segment_groups(ranks):
    a, b, offsets, _ = ranks[0]["sharded/inputs"]
    group_offsets = offsets[::2]  # segments (0,1), (2,3), (4,5) form groups 0, 1, 2
    want, stats, _, _ = pareto_lora.integrate(a, b, group_offsets, rule="mgda", active=torch.tensor([True, False, True]), backend="reference")
    torch.testing.assert_close(torch.cat([r["sharded/grouped_out"] for r in ranks]), want)
    torch.testing.assert_close(ranks[0]["sharded/grouped_stats"].double(), stats, rtol=1e-6, atol=1e-6)


def test_sharded_integrate_takes_every_rule_option(ranks):
    a, b, offsets, active = ranks[0]["sharded/inputs"]
    want = pareto_lora.integrate(a, b, offsets, rule="pareto_lora", tau=0.5, margin=0.7, active=active, backend="reference")
    torch.testing.assert_close(torch.cat([r["sharded/margin_out"] for r in ranks]), want.out)
    assert torch.equal(ranks[0]["sharded/margin_cases"], want.cases)
    # margin changes the outcome here: the last segment (cos -0.69) is no conflict under margin 0.7
    plain = pareto_lora.integrate(a, b, offsets, rule="pareto_lora", tau=0.5, active=active, backend="reference")
    assert not torch.equal(plain.cases, want.cases)


def test_sharded_integrate_scattered_groups(ranks):
    """Groups that are not runs of consecutive segments: summed locally, then rule and combine."""
    a, b, offsets, _ = ranks[0]["sharded/inputs"]
    pieces = [(offsets[s], offsets[s + 1]) for s in range(6)]
    order = [1, 3, 0, 2, 4, 5]  # group 0: segments 1, 3; group 1: 0, 2; group 2: 4, 5
    cat = lambda x: torch.cat([x[pieces[s][0]:pieces[s][1]] for s in order])  # noqa: E731
    sizes = [int(pieces[s][1] - pieces[s][0]) for s in order]
    bounds = torch.tensor([0, sizes[0] + sizes[1], sum(sizes[:4]), sum(sizes)])
    want, stats, _, _ = pareto_lora.integrate(cat(a), cat(b), bounds, rule="mgda", backend="reference")
    got = torch.cat([r["sharded/scattered_out"] for r in ranks])
    torch.testing.assert_close(cat(got), want)
    torch.testing.assert_close(ranks[0]["sharded/scattered_stats"], stats, rtol=1e-6, atol=1e-6)


def test_sharded_integrate_needs_process_group():
    a = torch.zeros(4)
    with pytest.raises(RuntimeError, match="not initialised"):
        pareto_lora.distributed.sharded_integrate(a, a, torch.tensor([0, 4]))

"""The training path's fused launches (pareto_lora.flat.step): which ops run, and that every path
(one fused launch, statistics then a fused launch with them given, statistics then a Python rule
then a combine) gives the same bits and the float64 oracle's result."""

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import pareto_lora
from pareto_lora import Case, RuleSpec, reference
from pareto_lora.backends import resolve_backend
from pareto_lora.flat import PythonRule, build_layout, flat_step, sum_into_groups
from pareto_lora.training import ParetoLoRA

import models
from _oracle import oracle


def pareto_ops(fn) -> Counter:
    """pareto_lora::* ops that one call of `fn` dispatches (torch.profiler, CPU)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("pareto_lora::"))


def losses_of(model, batch):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


@pytest.fixture(scope="module")
def llama():
    return models.lora_llama(num_layers=5)


def test_one_backward_step_is_one_fused_launch(llama):
    """A plain kernel rule: the step's integration is one pareto_lora::integrate, nothing else of ours."""
    pl = ParetoLoRA(llama, rule="pareto_lora", num_groups=3, modulate="all")
    lt, li = losses_of(llama, models.token_batch(seed=4))
    assert len(pl.layout.buckets) == 1
    assert pareto_ops(lambda: pl.backward(lt, li)) == Counter({"pareto_lora::integrate": 1})


def test_python_rule_takes_two_launches(llama):
    """Options that need the statistics first: one statistics launch, the rule in Python, one combine."""
    pl = ParetoLoRA(llama, rule="pareto_lora", num_groups=3, preserve_norm=True)
    lt, li = losses_of(llama, models.token_batch(seed=4))
    got = pareto_ops(lambda: pl.backward(lt, li))
    assert got == Counter({"pareto_lora::segment_stats": 1, "pareto_lora::rule_coefficients": 1,
                           "pareto_lora::combine": 1})


def _split_dtypes(num_layers=4):
    """A LoRA Llama whose lora_B factors are float64: two buckets, and every group spans both."""
    model = models.lora_llama(num_layers=num_layers)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = p.data.double()
    return model


def _random_flats(layout, seed):
    gen = torch.Generator().manual_seed(seed)
    text = [torch.randn(b.numel, generator=gen, dtype=torch.float64).to(b.dtype) for b in layout.buckets]
    image = [(-0.4 * t.double() + torch.randn(t.numel(), generator=gen, dtype=torch.float64)).to(t.dtype)
             for t in text]
    return text, image


class Owner:
    """What ParetoLoRA hands its sync: the kernel rule and no Python rule."""

    def __init__(self, spec):
        self.spec, self.python_rule = spec, None


@pytest.mark.parametrize("rule", ["pareto_lora", "mgda", "mmpareto"])
@pytest.mark.parametrize("model", ["one_bucket", "two_buckets"])
def test_every_path_gives_the_same_bits_and_the_oracle(rule, model, backend):
    name, device = backend
    model = (models.lora_llama(num_layers=4) if model == "one_bucket" else _split_dtypes()).to(device)
    layout = build_layout(model, num_groups=3, modulate="all")
    text, image = _random_flats(layout, seed=1)
    text, image = [t.to(device) for t in text], [t.to(device) for t in image]
    spec = RuleSpec(rule, tau=0.5)
    impl = resolve_backend(name, layout.device)

    def run(rule_of, stats=None):
        outs = [torch.empty_like(t) for t in text]
        step = flat_step(text, image, layout, rule_of, out=outs, backend=name, stats_per_unit=stats)
        return outs, step

    fused_out, fused = run(Owner(spec))
    python = PythonRule(lambda gs: impl.rule_coefficients(gs, spec, active=layout.active))
    py_out, py = run(python)
    given_out, given = run(Owner(spec), stats=fused.unit_stats.clone())
    for outs, step in ((py_out, py), (given_out, given)):
        assert all(torch.equal(x, y) for x, y in zip(outs, fused_out))
        for name in ("unit_stats", "group_stats", "coeffs", "cases"):
            assert torch.equal(getattr(step, name), getattr(fused, name)), name
    # The float64 oracle on each group's whole gradient, across buckets.
    names = {i: n for i, n in enumerate(layout.names)}
    grads, groups = {}, {}
    ug = layout.unit_group.tolist()
    for t, im, b in zip(text, image, layout.buckets):
        for i, off in zip(b.param_index, b.param_offset):
            k = layout.params[i].numel()
            grads[names[i]] = (t[off : off + k].cpu(), im[off : off + k].cpu())
            groups[names[i]] = ug[layout.param_unit[i]]
    want = oracle(grads, groups, set(range(layout.num_groups)), rule)
    # float32 coefficients (the kernels' for any buffer dtype) against the oracle's float64 ones
    scale = max(float(w.abs().max()) for w in want.values())
    for out, b in zip(fused_out, layout.buckets):
        for i, off in zip(b.param_index, b.param_offset):
            k = layout.params[i].numel()
            torch.testing.assert_close(out[off : off + k].double().cpu(), want[names[i]], rtol=2e-5, atol=1e-6 * scale,
                                       msg=names[i])


def test_poison_makes_every_path_nan_and_nonfinite(llama):
    layout = build_layout(llama, num_groups=3, modulate="all")
    text, image = _random_flats(layout, seed=2)
    spec = RuleSpec("pareto_lora")
    impl = resolve_backend("auto", layout.device)
    poison = torch.tensor(True)
    for rule in (Owner(spec), PythonRule(lambda gs: impl.rule_coefficients(gs, spec, active=layout.active))):
        outs = [torch.empty_like(t) for t in text]
        step = flat_step(text, image, layout, rule, out=outs, poison=poison)
        clean = flat_step(text, image, layout, rule, out=[torch.empty_like(t) for t in text])
        assert all(bool(o.isnan().all()) for o in outs)
        assert bool((step.cases == int(Case.NONFINITE)).all())
        assert torch.equal(step.coeffs, clean.coeffs)  # the rule's own coefficients are reported


def test_sum_into_groups_is_the_kernels_left_to_right_order():
    gen = torch.Generator().manual_seed(3)
    stats = torch.randn(9, 3, generator=gen, dtype=torch.float64) * torch.logspace(-8, 8, 9, dtype=torch.float64)[:, None]
    # runs of consecutive segments: the same bits as the fused op's group sum
    seg_group = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])
    groups = torch.tensor([0, 3, 5, 6, 9])
    assert torch.equal(sum_into_groups(stats, seg_group, 4), reference.group_sums(stats, groups))
    # any map: +0.0, then each group's rows in segment order
    seg_group = torch.tensor([2, 0, 1, 0, 2, 2, 0, 1, 0])
    want = torch.zeros(4, 3, dtype=torch.float64)
    for s, g in enumerate(seg_group.tolist()):
        want[g] = want[g] + stats[s]
    assert torch.equal(sum_into_groups(stats, seg_group, 4), want)

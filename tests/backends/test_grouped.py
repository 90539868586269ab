"""The fused op over a training step: ``groups``, ``poison`` and given ``stats`` on every backend.

A group is a run of consecutive segments, so its elements are contiguous: a grouped call must equal
an ungrouped call on the groups' own offsets (within the statistics' rounding: the group sums run
in another order), and its group statistics must be bitwise the per-segment rows summed left to
right from +0.0 (reference.group_sums), the one order every backend and device uses.
"""

import math

import pytest
import torch

import pareto_lora
from pareto_lora import Case, RuleSpec, reference
from pareto_lora.rules import STATS_REL_ERR
from _inputs import make_pair, random_offsets, random_sizes

RULES = ["pareto_lora", "mmpareto", "mgda", "sum"]


def _layout(seed, num_segments=12, mean=40, empty_groups=True):
    gen = torch.Generator().manual_seed(seed)
    offsets = random_offsets(random_sizes(num_segments, mean, gen, empty_every=5))
    cuts = sorted(torch.randint(0, num_segments + 1, (4,), generator=gen).tolist())
    if not empty_groups:
        cuts = sorted(set(c for c in cuts if 0 < c < num_segments))
    groups = torch.tensor([0, *cuts, num_segments], dtype=torch.int64)
    return offsets, groups, gen


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _call(backend, a, b, offsets, **kw):
    name, device = backend
    return pareto_lora.integrate(a.to(device), b.to(device), offsets, backend=name, **kw)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_equals_the_ungrouped_op_on_the_groups_offsets(any_backend, rule, seed):
    offsets, groups, gen = _layout(seed)
    a, b = make_pair(int(offsets[-1]), torch.float32, "cpu", gen)
    g = groups.numel() - 1
    active = torch.rand(g, generator=gen) > 0.2
    res = _call(any_backend, a, b, offsets, rule=rule, active=active.to(any_backend[1]), groups=groups)
    assert res.stats.shape == (offsets.numel() - 1, 3) and res.group_stats.shape == (g, 3)
    assert res.coeffs.shape == (g, 2) and res.cases.shape == (g,)
    # per-segment statistics: exactly those of the ungrouped call on the same backend
    plain = _call(any_backend, a, b, offsets, rule=rule)
    assert torch.equal(_bits(res.stats), _bits(plain.stats))
    # group statistics: the rows summed left to right from +0.0, bit for bit
    assert torch.equal(_bits(res.group_stats.cpu()), _bits(reference.group_sums(res.stats.cpu(), groups)))
    # the float64 oracle: one segment per group
    want = pareto_lora.integrate(a.double(), b.double(), offsets[groups], rule=rule, active=active, backend="reference")
    torch.testing.assert_close(res.group_stats.cpu(), want.stats, rtol=STATS_REL_ERR, atol=0)
    assert torch.equal(res.cases.cpu(), want.cases)
    torch.testing.assert_close(res.coeffs.cpu().double(), want.coeffs, rtol=1e-5, atol=1e-6)
    scale = float(want.coeffs.abs().max()) * float(torch.maximum(a.abs(), b.abs()).max())
    torch.testing.assert_close(res.out.cpu().double(), want.out, rtol=1e-5, atol=1e-6 * scale)


def test_empty_groups_get_zero_statistics_and_the_degenerate_case(any_backend):
    offsets = torch.tensor([0, 5, 5, 9])
    groups = torch.tensor([0, 0, 1, 2, 2, 3])  # groups 0 and 3 are empty, group 2 is one empty segment
    gen = torch.Generator().manual_seed(4)
    a, b = make_pair(9, torch.float32, "cpu", gen)
    res = _call(any_backend, a, b, offsets, groups=groups)
    gs = res.group_stats.cpu()
    assert torch.equal(gs[[0, 2, 3]], torch.zeros(3, 3, dtype=torch.float64))
    assert res.cases.cpu()[[0, 2, 3]].tolist() == [int(Case.DEGENERATE)] * 3
    want = reference.integrate(a, b, offsets, groups=groups)
    torch.testing.assert_close(res.out.cpu(), want.out)


def test_groups_as_a_list_and_single_segment_groups_are_the_plain_op(any_backend):
    offsets, _, gen = _layout(5)
    a, b = make_pair(int(offsets[-1]), torch.float32, "cpu", gen)
    s = offsets.numel() - 1
    plain = _call(any_backend, a, b, offsets, rule="pareto_lora")
    grouped = _call(any_backend, a, b, offsets, rule="pareto_lora", groups=list(range(s + 1)))
    for x, y in zip((plain.out, plain.stats, plain.coeffs, plain.cases, plain.group_stats),
                    (grouped.out, grouped.stats, grouped.coeffs, grouped.cases, grouped.group_stats)):
        assert torch.equal(_bits(x), _bits(y))


def test_without_groups_group_stats_equal_stats_in_a_separate_tensor(any_backend):
    offsets, _, gen = _layout(6)
    a, b = make_pair(int(offsets[-1]), torch.float32, "cpu", gen)
    res = _call(any_backend, a, b, offsets)
    assert torch.equal(_bits(res.group_stats), _bits(res.stats))
    assert res.group_stats.data_ptr() != res.stats.data_ptr()


@pytest.mark.parametrize("grouped", [False, True])
def test_poison(any_backend, grouped):
    name, device = any_backend
    offsets, groups, gen = _layout(7)
    a, b = make_pair(int(offsets[-1]), torch.float32, "cpu", gen)
    kw = dict(rule="pareto_lora", groups=groups if grouped else None)
    clean = _call(any_backend, a, b, offsets, **kw)
    off = _call(any_backend, a, b, offsets, poison=torch.tensor(False, device=device), **kw)
    for x, y in zip((clean.out, clean.stats, clean.coeffs, clean.cases), (off.out, off.stats, off.coeffs, off.cases)):
        assert torch.equal(_bits(x), _bits(y))
    on = _call(any_backend, a, b, offsets, poison=torch.tensor(True, device=device), **kw)
    assert bool(on.out.isnan().all())
    assert bool((on.cases == int(Case.NONFINITE)).all()) and bool(on.nonfinite)
    assert torch.equal(_bits(on.coeffs), _bits(clean.coeffs))  # the rule's own coefficients
    assert torch.equal(_bits(on.stats), _bits(clean.stats))


def test_poison_matches_the_reference(any_backend):
    offsets, groups, gen = _layout(8)
    a, b = make_pair(int(offsets[-1]), torch.float32, "cpu", gen)
    poison = torch.tensor(True)
    want = reference.integrate(a, b, offsets, groups=groups, poison=poison)
    res = _call(any_backend, a, b, offsets, groups=groups, poison=poison.to(any_backend[1]))
    assert torch.equal(res.cases.cpu(), want.cases) and bool(want.out.isnan().all())


@pytest.mark.parametrize("grouped", [False, True])
def test_given_stats_replace_the_statistics_pass(any_backend, grouped):
    name, device = any_backend
    offsets, groups, gen = _layout(9)
    a, b = make_pair(int(offsets[-1]), torch.float32, "cpu", gen)
    kw = dict(rule="pareto_lora", groups=groups if grouped else None)
    own = _call(any_backend, a, b, offsets, **kw)
    again = _call(any_backend, a, b, offsets, stats=own.stats.clone(), **kw)
    for x, y in zip((own.out, own.stats, own.coeffs, own.cases, own.group_stats),
                    (again.out, again.stats, again.coeffs, again.cases, again.group_stats)):
        assert torch.equal(_bits(x), _bits(y))
    # other statistics (e.g. all-reduced over ranks): the rule sees them, not a and b's
    given = own.stats.clone()
    given[:, 2] = -given[:, 2]  # flip every a.b: conflicts appear where there were none
    res = _call(any_backend, a, b, offsets, stats=given, **kw)
    assert torch.equal(_bits(res.stats), _bits(given)) and res.stats.data_ptr() != given.data_ptr()
    gsum = reference.group_sums(given.cpu(), groups) if grouped else given.cpu()
    coeffs, cases = pareto_lora.rule_coefficients(gsum, "pareto_lora", backend="reference")
    assert torch.equal(res.cases.cpu(), cases)
    torch.testing.assert_close(res.coeffs.cpu(), coeffs, rtol=1e-6, atol=0)


def test_spec_and_loose_keywords_give_the_same_bits(any_backend):
    offsets, groups, gen = _layout(10)
    a, b = make_pair(int(offsets[-1]), torch.float32, "cpu", gen)
    loose = _call(any_backend, a, b, offsets, rule="mmpareto", tau=0.3, gamma=1.5, symmetric=True, groups=groups)
    spec = _call(any_backend, a, b, offsets, rule=RuleSpec("mmpareto", 0.3, 1.5, True), groups=groups)
    for x, y in zip(loose, spec):
        assert torch.equal(_bits(x), _bits(y))


def test_float64_group_sum_is_exactly_left_to_right():
    # 1 + 2^-53 + 2^-53: left to right rounds each tiny term away; any other order keeps 2^-52.
    eps = 2.0**-53
    stats = torch.tensor([[1.0, 1.0, 1.0], [eps, eps, eps], [eps, eps, eps]], dtype=torch.float64)
    got = reference.group_sums(stats, torch.tensor([0, 3]))
    assert got[0, 0].item() == 1.0 and ((1.0 + eps) + eps) == 1.0 and (1.0 + (eps + eps)) != 1.0
    assert math.copysign(1.0, reference.group_sums(-torch.zeros(1, 3, dtype=torch.float64),
                                                   torch.tensor([0, 1]))[0, 2].item()) == 1.0

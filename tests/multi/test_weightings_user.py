"""The user-defined weighting (multi/weightings/user.py): a plain callable on the batched Gram and
torchjd's Weighting objects, their validation, and what finish does with their weights."""

import math

import pytest
import torch
from torchjd.aggregation import (MeanWeighting, MGDA, NashMTL, PCGradWeighting, UPGrad, UPGradWeighting,
                                 AlignedMTLWeighting)

from pareto_lora import Case, RuleSpec
from pareto_lora.multi.weightings import apply, check_rule

F64 = torch.float64


def grams(k=3, groups=5, seed=0):
    j = torch.randn(groups, k, 9, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return j @ j.transpose(-1, -2)


def test_plain_callable_sees_the_batched_gram_once():
    seen = []

    def inverse_norms(gram):
        seen.append((tuple(gram.shape), gram.dtype))
        return torch.diagonal(gram, dim1=-2, dim2=-1).rsqrt()

    g = grams()
    w, cases = apply(inverse_norms, g, dtype=F64)
    assert seen == [((5, 3, 3), F64)]  # one call on the whole batch: no loop over groups
    assert torch.equal(w, torch.diagonal(g, dim1=-2, dim2=-1).rsqrt())
    assert (cases == int(Case.WEIGHTED)).all()


def test_callable_weights_are_made_float64_then_the_requested_dtype():
    w, _ = apply(lambda gram: torch.ones(gram.shape[:-1], dtype=torch.float16), grams(), dtype=torch.float32)
    assert w.dtype == torch.float32 and torch.equal(w, torch.ones(5, 3))


def test_nonfinite_weights_give_that_group_the_plain_sum():
    def nan_in_group_1(gram):
        w = torch.full(gram.shape[:-1], 0.5, dtype=gram.dtype)
        w[1, 2] = math.nan
        w[3, 0] = 1e300  # a weight float32 cannot apply
        return w

    w, cases = apply(nan_in_group_1, grams(), dtype=F64)
    assert cases.tolist() == [int(Case.WEIGHTED), int(Case.NONFINITE), int(Case.WEIGHTED), int(Case.NONFINITE),
                              int(Case.WEIGHTED)]
    assert torch.equal(w[1], torch.ones(3, dtype=F64)) and torch.equal(w[0], torch.full((3,), 0.5, dtype=F64))


def test_inactive_and_invalid_groups_as_for_a_rule():
    g = grams()
    g[2, 0, 0] = -1.0  # a negative squared norm: invalid
    active = torch.tensor([True, False, True, True, True])
    w, cases = apply(lambda gram: torch.full(gram.shape[:-1], 0.25, dtype=gram.dtype), g, active, F64)
    assert int(cases[1]) == Case.INACTIVE and int(cases[2]) == Case.NONFINITE
    assert torch.equal(w[1], torch.ones(3, dtype=F64)) and torch.equal(w[2], torch.ones(3, dtype=F64))


@pytest.mark.parametrize("bad, match", [
    (lambda gram: torch.ones(3),
     r"^rule: expected the weighting to return weights of shape \[G, K\] = \[5, 3\], got \(3,\)"),
    (lambda gram: [1.0, 1.0, 1.0], r"^rule: expected the weighting to return weights of shape .* got list"),
    (lambda gram: torch.ones(5, 3, dtype=torch.complex64), r"^rule: expected real weights"),
])
def test_bad_callable_results_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        apply(bad, grams(), dtype=F64)


def test_check_rule_takes_callables_and_refuses_other_objects():
    check_rule(lambda gram: gram, 3)
    check_rule(UPGradWeighting(), 3)
    with pytest.raises(ValueError, match=r"^rule: expected a RuleSpec"):
        check_rule(3.0, 3)
    with pytest.raises(ValueError, match=r"^rule: expected a torchjd Gramian weighting.*NashMTL"):
        check_rule(NashMTL(n_tasks=3), 3)


@pytest.mark.parametrize("make", [UPGradWeighting, MeanWeighting, PCGradWeighting, AlignedMTLWeighting,
                                  lambda: UPGrad(), lambda: MGDA()])
def test_torchjd_weightings_match_torchjd_per_group(make):
    """vmap where torchjd's weighting traces, else the loop over groups: the weights are torchjd's own."""
    g = grams(k=4, groups=6, seed=3)
    torch.manual_seed(0)  # PCGrad draws random orders; seed both sides alike
    w, cases = apply(make(), g, dtype=F64)
    fn = make()
    fn = getattr(fn, "gramian_weighting", fn)
    torch.manual_seed(0)
    expected = torch.stack([fn(x) for x in g])
    assert torch.allclose(w, expected, rtol=1e-12, atol=1e-15)
    assert (cases == int(Case.WEIGHTED)).all()


def test_user_upgrad_agrees_with_our_rule_within_quadprog():
    """torchjd's UPGradWeighting as a user weighting and our ``upgrad`` rule: the same QP (quadprog, cond
    <= 1e4 on G/tr G + 1e-4 I) above torchjd's norm_eps on the trace: weights within 1e-10."""
    g = grams(k=5, groups=4, seed=4)
    theirs, _ = apply(UPGradWeighting(), g, dtype=F64)
    ours, _ = apply(RuleSpec("upgrad"), g, dtype=F64)
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-10)

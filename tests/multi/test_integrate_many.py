"""integrate_many on the float64 reference: the composition (Gram -> weighting -> combine), its
groups, active, poison and given statistics, and its argument checks (before anything is written)."""

import math

import pytest
import torch

import pareto_lora
from pareto_lora import Case, RuleSpec
from pareto_lora.multi import gram_matrix, num_pairs, pairs, upper_triangle


def _grads(k, n=60, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for _ in range(k)]


def test_layout_round_trip_and_order():
    assert pairs(3) == ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    s = torch.arange(num_pairs(4), dtype=torch.float64)
    m = gram_matrix(s, 4)
    assert torch.equal(m, m.T) and torch.equal(upper_triangle(m), s)
    with pytest.raises(ValueError, match=r"^stats: expected a last dimension of K\(K\+1\)/2 = 10"):
        gram_matrix(torch.zeros(6), 4)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_gram_is_the_exact_dot_products(k):
    grads, offsets = _grads(k), [0, 7, 7, 60]
    st = pareto_lora.gram(grads, offsets, backend="reference")
    assert st.shape == (3, num_pairs(k)) and st.dtype == torch.float64
    for s, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        for p, (i, j) in enumerate(pairs(k)):
            terms = [float(x) * float(y) for x, y in zip(grads[i][lo:hi], grads[j][lo:hi])]  # exact in float64
            # float64 additions only: |error| <= n 2^-53 sum |terms| (rules.STATS_REL_ERR is far looser)
            bound = len(terms) * 2.0**-53 * math.fsum(abs(t) for t in terms)
            assert abs(st[s, p].item() - math.fsum(terms)) <= bound


def test_mean_constant_sum_and_groups():
    grads, offsets = _grads(3), [0, 20, 40, 60]
    res = pareto_lora.integrate_many(grads, offsets, "constant", weights=(1.0, 0.5, 2.0), groups=[0, 2, 3],
                                     backend="reference")
    want = grads[0] + 0.5 * grads[1] + 2.0 * grads[2]
    torch.testing.assert_close(res.out, want)
    assert res.weights.shape == (2, 3) and res.cases.tolist() == [int(Case.WEIGHTED)] * 2
    torch.testing.assert_close(res.group_stats[0], res.stats[0] + res.stats[1], rtol=0, atol=0)
    res = pareto_lora.integrate_many(grads, offsets, "sum", backend="reference")
    torch.testing.assert_close(res.out, grads[0] + grads[1] + grads[2])
    assert res.cases.tolist() == [int(Case.SUMMED)] * 3


def test_inactive_nonfinite_and_poison():
    grads, offsets = _grads(3), [0, 20, 40, 60]
    grads[2][45] = float("nan")
    res = pareto_lora.integrate_many(grads, offsets, "mean", active=[True, False, True], backend="reference")
    assert res.cases.tolist() == [int(Case.WEIGHTED), int(Case.INACTIVE), int(Case.NONFINITE)]
    assert res.weights[1].tolist() == [1.0] * 3 and res.weights[2].tolist() == [1.0] * 3
    res = pareto_lora.integrate_many(grads, offsets, "mean", poison=torch.tensor(True), backend="reference")
    assert res.out.isnan().all() and (res.cases == int(Case.NONFINITE)).all()


def test_in_place_and_given_stats():
    grads, offsets = _grads(4), [0, 30, 60]
    want = pareto_lora.integrate_many(grads, offsets, "mean", backend="reference")
    given = want.stats.clone()
    copy = [g.clone() for g in grads]
    res = pareto_lora.integrate_many(copy, offsets, "mean", out=copy[2], stats=given, backend="reference")
    assert res.out is copy[2] and torch.equal(copy[2], want.out)
    assert res.stats is not given and torch.equal(res.stats, given)


@pytest.mark.parametrize("call, message", [
    (lambda g, o: pareto_lora.integrate_many(g[:1], o, backend="reference"), r"^grads: expected 2 to 8 tensors"),
    (lambda g, o: pareto_lora.integrate_many(g[0], o, backend="reference"), r"^grads: expected a list or tuple"),
    (lambda g, o: pareto_lora.integrate_many([g[0], g[1][:-1], g[2]], o, backend="reference"),
     r"^grads\[1\]: expected numel 60"),
    (lambda g, o: pareto_lora.integrate_many([g[0], g[1].double(), g[2]], o, backend="reference"),
     r"^grads\[1\]: expected dtype float32"),
    (lambda g, o: pareto_lora.integrate_many(g, o, "pareto_lora", backend="reference"),
     r"^rule: 'pareto_lora' has no K-objective form"),
    (lambda g, o: pareto_lora.integrate_many(g, o, "constant", backend="reference"),
     r"^weights: expected 3 weights"),
    (lambda g, o: pareto_lora.integrate_many(g, o, out=g[0][1:].clone(), backend="reference"),
     r"^out: expected numel 60"),
    (lambda g, o: pareto_lora.integrate_many(g, o, stats=torch.zeros(2, 3, dtype=torch.float64),
                                             backend="reference"), r"^stats: expected shape \[2, 6\]"),
    (lambda g, o: pareto_lora.integrate_many(g, o, stats=[[0.0] * 6] * 2, backend="reference"),
     r"^stats: expected a float64 Tensor or None, got list"),
    (lambda g, o: pareto_lora.combine_many(g, o, torch.ones(2, 2), backend="reference"),
     r"^coeffs: expected shape \[2, 3\]"),
])
def test_bad_arguments_write_nothing(call, message):
    grads, offsets = _grads(3), [0, 30, 60]
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match=message):
        call(grads, offsets)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


def test_two_objective_op_refuses_more_than_two_weights():
    with pytest.raises(ValueError, match=r"^weights: expected a pair \(w_a, w_b\) for the two-objective op"):
        pareto_lora.integrate(*_grads(2), [0, 60], rule=RuleSpec("constant", weights=(1, 2, 3)), backend="reference")


def test_user_weighting_through_integrate_many():
    """A plain callable on the batched Gram gives the combine its weights; its parameters are refused."""
    grads, offsets = _grads(3), [0, 20, 40, 60]
    seen = []

    def inverse_norms(g):  # [G, K, K] float64 -> [G, K]: one call for all groups
        seen.append(tuple(g.shape))
        return 1.0 / torch.diagonal(g, dim1=-2, dim2=-1).sqrt()

    res = pareto_lora.integrate_many(grads, offsets, inverse_norms, groups=[0, 1, 3], backend="reference")
    assert seen == [(2, 3, 3)]
    norms = torch.diagonal(gram_matrix(res.group_stats, 3), dim1=-2, dim2=-1).sqrt()
    torch.testing.assert_close(res.weights, (1.0 / norms).float())
    want = sum(grads[k][:20].double() / norms[0, k] for k in range(3))
    torch.testing.assert_close(res.out[:20], want.float())
    with pytest.raises(ValueError, match=r"^tau: expected no rule parameters with a user-defined weighting"):
        pareto_lora.integrate_many(grads, offsets, inverse_norms, tau=0.3, backend="reference")

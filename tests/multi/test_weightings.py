"""The K-objective weightings against torchjd 0.18 on random Gram matrices (K = 2..8), and at K = 2
against the two-objective rule of the same name (pareto_lora.reference.rule_coefficients).

Tolerances (each justified by the solver on the other side):
- mgda: torchjd runs Frank-Wolfe and stops at a step below epsilon; its weights are a feasible point
  of the simplex, so ||its output||^2 >= ||ours||^2 - rounding (ours is the exact min-norm point), and
  by strong convexity of ||.||^2 on the hull ||its - ours||^2 <= ||its||^2 - ||ours||^2: the test
  asserts both (no fixed tolerance on the weights: Frank-Wolfe's are only as good as its gap).
- K = 2 parity: the two-objective rule stores its coefficients in float32 (relative 2^-24); ours are
  float64: |ours - its| <= 2^-23 max(1, |ours|).
"""

import math

import pytest
import torch
from torchjd.aggregation import MGDAWeighting

from pareto_lora import Case, RuleSpec
from pareto_lora.multi.weightings import apply
from pareto_lora.reference import rule_coefficients

F64 = torch.float64


def jacobians(k, groups=12, n=7, seed=0):
    """[G, K, n] float64 random Jacobians with norms spread over 1e-3 .. 1e3 (per row)."""
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(groups, k, n, generator=g, dtype=F64)
    return j * 10.0 ** (6 * torch.rand(groups, k, 1, generator=g, dtype=F64) - 3)


def gram_of(j):
    return j @ j.transpose(-1, -2)


def weights(name, gram, **kw):
    return apply(RuleSpec(name, **kw), gram, dtype=F64)


@pytest.mark.parametrize("k", range(2, 9))
def test_mgda_is_the_exact_min_norm_point_torchjd_approaches(k):
    j = jacobians(k, seed=k)
    w, cases = weights("mgda", gram_of(j))
    assert (cases == int(Case.PARETO)).all()
    assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(len(w), dtype=F64), rtol=0, atol=1e-12)
    ours = (w[..., None] * j).sum(1)
    for row, jac in zip(ours, j):
        tw = MGDAWeighting(epsilon=1e-7, max_iters=2_000)(gram_of(jac))
        theirs = tw @ jac
        scale = float((jac * jac).sum())
        gap = float(theirs @ theirs - row @ row)
        assert gap >= -1e-12 * scale  # ours is never longer than a point of the hull
        assert float((theirs - row).norm()) ** 2 <= max(gap, 0.0) + 1e-12 * scale


def two_objective(name, gram, **kw):
    st = torch.stack([gram[:, 0, 0], gram[:, 1, 1], gram[:, 0, 1]], dim=1)
    return rule_coefficients(st, RuleSpec(name, **kw))


def pair_grams():
    """2x2 Grams over norms 0, 1e-3 .. 1e3 (ratios to 1e6) and cosines from -1 to 1 (edges exact)."""
    rows = []
    for na in (0.0, 1e-3, 1.0, 1e3):
        for nb in (0.0, 1e-3, 1.0, 1e3):
            for c in (-1.0, -0.999999, -0.7, -1e-3, 0.0, 0.3, 0.999999, 1.0):
                rows.append([[na * na, c * na * nb], [c * na * nb, nb * nb]])
    return torch.tensor(rows, dtype=F64)


K2_RULES = ("mgda", "upgrad", "dualproj", "pcgrad", "imtl_g", "aligned_mtl", "nash_mtl")


@pytest.mark.parametrize("name", K2_RULES)
def test_k2_equals_the_two_objective_rule(name):
    gram = pair_grams()
    nan = gram[:1].clone()
    nan[0, 0, 1] = nan[0, 1, 0] = math.nan
    gram = torch.cat([gram, nan])
    w, cases = weights(name, gram)
    co, ca = two_objective(name, gram)
    assert torch.equal(cases, ca)
    assert ((w - co.to(F64)).abs() <= 2.0**-23 * w.abs().clamp_min(1.0)).all()

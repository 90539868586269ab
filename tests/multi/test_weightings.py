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


K2_RULES = ("sum", "mean", "mgda", "upgrad", "dualproj", "pcgrad", "imtl_g", "aligned_mtl", "nash_mtl", "config", "cagrad")


@pytest.mark.parametrize("name,kw", [(name, {}) for name in K2_RULES] + [
    ("cagrad", {"c": 0.0}), ("cagrad", {"c": 0.9}), ("cagrad", {"c": 2.0}), ("nash_mtl", {"max_norm": 0.0}),
    ("nash_mtl", {"max_norm": 0.5}), ("upgrad", {"reg_eps": 0.0}), ("dualproj", {"reg_eps": 1e-2}),
    ("constant", {"weights": (0.25, 1.5)})])
def test_k2_equals_the_two_objective_rule(name, kw):
    gram = pair_grams()
    nan = gram[:1].clone()
    nan[0, 0, 1] = nan[0, 1, 0] = math.nan
    gram = torch.cat([gram, nan])
    w, cases = weights(name, gram, **kw)
    co, ca = two_objective(name, gram, **kw)
    assert torch.equal(cases, ca)
    assert ((w - co.to(F64)).abs() <= 2.0**-23 * w.abs().clamp_min(1.0)).all()


# torchjd parity of the other rules. Tolerances, relative to sum_k ||g_k|| (the scale of the output):
# - upgrad, dualproj: torchjd's quadprog solves the same QP on G/tr G + reg_eps I, condition number
#   <= (1 + reg_eps)/reg_eps = 1e4, so its weights carry ~1e4 2^-52 ~ 2e-12: allowed 1e-10.
# - imtl_g, aligned_mtl, config: torchjd's pinv / eigh on G (U) carry 2^-52 cond(G) (relative), ours the same
#   on C and G: allowed 2^-52 cond(G) K + 1e-12, cond(G) computed per group (the random norms span
#   1e-3 .. 1e3, so cond(G) reaches ~1e12 and the bound is what the solvers promise, no more).
# - pcgrad: closed-form projections on both sides, torchjd's random order pinned to ours: 1e-12.
from torchjd.aggregation import (AlignedMTLWeighting, ConFIG, DualProjWeighting, IMTLGWeighting,  # noqa: E402
                                 NashMTL, PCGradWeighting, UPGradWeighting)
from torchjd.linalg import QuadprogProjector  # noqa: E402

from pareto_lora.multi.weightings.correlation import correlation  # noqa: E402
from pareto_lora.multi.weightings.nash_mtl import NASH_TOL, nash_point  # noqa: E402


def _projector(reg_eps):
    # norm_eps=0: torchjd's absolute trace threshold is a documented difference (docs/rules.md), tested apart
    return QuadprogProjector(norm_eps=0.0, reg_eps=reg_eps)


def _pcgrad_in_our_order(monkeypatch, k):
    """torchjd's PCGradWeighting with its randperm pinned to our cyclic order (row i: i+1, ..., i-1)."""
    calls = iter(range(k))
    def cyclic(n, *args, **kwargs):
        i = next(calls)
        return torch.tensor([(i + s) % k for s in range(k)])

    monkeypatch.setattr(torch, "randperm", cyclic)
    return PCGradWeighting()


def _theirs(name, jac, spec, monkeypatch):
    """torchjd's output on the Jacobian `jac`."""
    gram = gram_of(jac)
    if name == "config":  # an aggregator of the matrix (its weights are not exposed)
        return ConFIG()(jac)
    if name == "pcgrad":
        with monkeypatch.context() as m:
            return _pcgrad_in_our_order(m, gram.shape[-1])(gram) @ jac
    make = {"upgrad": lambda: UPGradWeighting(projector=_projector(spec.reg_eps)),
            "dualproj": lambda: DualProjWeighting(projector=_projector(spec.reg_eps)),
            "imtl_g": IMTLGWeighting, "aligned_mtl": AlignedMTLWeighting}[name]
    return make()(gram) @ jac


def _tolerance(name, gram):
    if name in ("upgrad", "dualproj"):
        return 1e-10
    if name == "pcgrad":
        return 1e-12
    s = torch.linalg.svdvals(gram)
    return 2.0**-52 * float(s[0] / s[-1]) * gram.shape[-1] + 1e-12


@pytest.mark.parametrize("name,kw", [("upgrad", {}), ("upgrad", {"reg_eps": 1e-2}), ("dualproj", {}),
                                     ("pcgrad", {}), ("imtl_g", {}), ("aligned_mtl", {}), ("config", {})])
@pytest.mark.parametrize("k", range(2, 9))
def test_matches_torchjd_on_random_grams(name, kw, k, monkeypatch):
    j = jacobians(k, groups=8, n=12, seed=10 + k)  # n >= K: full rank (rank-deficient Grams: the edge tests)
    spec = RuleSpec(name, **kw)
    w, _ = apply(spec, gram_of(j), dtype=F64)
    for wg, jac in zip(w, j):
        gram = gram_of(jac)
        theirs = _theirs(name, jac, spec, monkeypatch)
        scale = float(jac.norm(dim=1).sum())
        assert float((wg @ jac - theirs).norm()) <= _tolerance(name, gram) * scale, (name, k)


def _nash_residual(agg, jac):
    """torchjd's own distance from the Nash condition w_i (G w)_i = 1 (before its clipping)."""
    w = torch.as_tensor(agg.weighting.prvs_alpha, dtype=F64)
    return float((w * (gram_of(jac) @ w) - 1.0).abs().max())


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_nash_mtl_matches_torchjd_where_its_solver_converged(k):
    """torchjd iterates 20 convex approximations (ECOS) from w = 1 and often stops short of G w = 1/w;
    its own residual rho is the justified tolerance: ||ours - theirs|| <= rho ||ours|| where rho < 0.1
    (the two-objective test's criterion, tests/test_family_b.py). Norms near 1, where it converges."""
    g = torch.Generator().manual_seed(k)
    j = torch.randn(16, k, 12, generator=g, dtype=F64) * (1 + 0.2 * torch.rand(16, k, 1, generator=g, dtype=F64))
    w, cases = weights("nash_mtl", gram_of(j), max_norm=0.0)
    assert (cases == int(Case.WEIGHTED)).all()
    close = 0
    for wg, jac in zip(w, j):
        agg = NashMTL(n_tasks=k, max_norm=0.0)  # stateful: a fresh one per group
        theirs = agg(jac)
        rho = _nash_residual(agg, jac)
        if rho < 0.1:
            assert float((wg @ jac - theirs).norm()) <= rho * float((wg @ jac).norm()) + 1e-12
            close += 1
    assert close >= 4


@pytest.mark.parametrize("k", range(2, 9))
def test_nash_point_meets_its_stated_tolerance(k):
    """The fixed 60 damped-Newton iterations reach max_k |y_k (C y)_k - 1| <= NASH_TOL on random
    correlation matrices, near-stationary ones included: in half the groups g_0 is within 1e-2 (in
    direction) of minus a random convex combination of the others' directions, which puts the hull's
    min-norm point down to the STATIONARY threshold itself (measured min w^T C w ~ 1.5e-5)."""
    g = torch.Generator().manual_seed(20 + k)
    j = jacobians(k, groups=128, n=k + 3, seed=20 + k)
    u = j / j.norm(dim=-1, keepdim=True)
    lam = torch.rand(64, k - 1, 1, generator=g, dtype=F64)
    j[::2, 0] = -(lam / lam.sum(1, keepdim=True) * u[::2, 1:]).sum(1) + 1e-2 * u[::2, 0]
    w, cases = weights("nash_mtl", gram_of(j), max_norm=0.0)
    live = cases == int(Case.WEIGHTED)
    assert live.sum() >= 80 and (cases == int(Case.STATIONARY)).any()
    c, _, _ = correlation(gram_of(j)[live])
    y = nash_point(c)
    assert float((y * (c @ y[..., None])[..., 0] - 1.0).abs().max()) <= NASH_TOL
    # and the weights applied are those: ||out||^2 = K (no clipping)
    out = (w[live][..., None] * j[live]).sum(1)
    assert torch.allclose(out.norm(dim=1) ** 2, torch.full((int(live.sum()),), float(k), dtype=F64), rtol=1e-9)


def _cagrad_objective(w, gram, c):
    """F(w) = g_w . g0 + c ||g0|| ||g_w|| on the trace-normalised Gram (what both sides minimise)."""
    g = gram / torch.diagonal(gram).sum()
    k = len(w)
    return float(w @ g.sum(1) / k + c * (g.sum() / k**2).sqrt() * (w @ g @ w).clamp_min(0).sqrt())


@pytest.mark.parametrize("c", [0.4, 0.9, 2.0])
@pytest.mark.parametrize("k", range(2, 9))
def test_cagrad_matches_torchjd_within_its_solver_tolerance(k, c):
    """torchjd's Clarabel stops at a duality gap of 1e-8 on an objective of order 1; ours is the exact
    minimiser: its F is never above torchjd's by more than 1e-8, and the outputs agree to
    1e-4 (1 + c) sum_k ||g_k|| (F is flat at its minimum: a gap of 1e-8 moves the point by O(1e-4);
    the two-objective tests' tolerance, tests/test_family_b.py)."""
    from torchjd.aggregation import CAGradWeighting
    g = torch.Generator().manual_seed(30 + k)  # norms within 1e-1 .. 1e1: mostly not stationary
    j = torch.randn(8, k, 12, generator=g, dtype=F64) * 10.0 ** (2 * torch.rand(8, k, 1, generator=g, dtype=F64) - 1)
    w, cases = weights("cagrad", gram_of(j), c=c)
    compared = 0
    for wg, cg, jac in zip(w, cases, j):
        gram = gram_of(jac)
        tw = CAGradWeighting(c=c)(gram)
        if int(cg) == Case.STATIONARY or not bool((tw != 0).any()):
            assert int(cg) == Case.STATIONARY and not bool((tw != 0).any())  # both call it stationary
            continue
        ours_w, theirs_w = wg - 1.0 / k, tw - 1.0 / k  # (k/||g_w||) w: the simplex point up to a positive factor
        ours_f = _cagrad_objective(ours_w / ours_w.sum(), gram, c)
        assert ours_f <= _cagrad_objective(theirs_w / theirs_w.sum(), gram, c) + 1e-8
        assert float((wg @ jac - tw @ jac).norm()) <= 1e-4 * (1 + c) * float(jac.norm(dim=1).sum())
        compared += 1
    assert compared >= 4

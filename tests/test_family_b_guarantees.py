"""cagrad, nash_mtl, aligned_mtl and config: the edges (a = b, a = -b, one side zero, a NaN segment, a 1e6
norm ratio) on every backend and as torchjd gives them, scale and swap symmetry, and the norm bounds
(docs/rules.md, the gradient-manipulation family) on statistics with rounding error. Parity with torchjd:
tests/test_family_b.py.
"""

import math
import pathlib
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pareto_lora
from _family_b import RULES_B, aggregate, aggregator, ours, pair
from pareto_lora import Case, RuleSpec
from pareto_lora.rules import CAGRAD_NORM_EPS, STATS_REL_ERR


# ---- 1. the edges, on every backend ------------------------------------------------------------------------
def _edge(kind):
    a, _ = pair(2.0, 1.0, 0.0, seed=7, n=257)
    return {"identical": (a, a.clone()), "anti": (a, -a), "b_zero": (a, 0 * a), "a_zero": (0 * a, a),
            "both_zero": (0 * a, 0 * a)}[kind]


W, S, D = Case.WEIGHTED, Case.STATIONARY, Case.DEGENERATE
EDGES = {  # kind -> rule -> (case, out as a function of a, b); c = 0.4, max_norm = 1
    "identical": {"cagrad": (W, lambda a, b: 1.4 * a), "nash_mtl": (W, lambda a, b: a / a.norm()),
                  "aligned_mtl": (W, lambda a, b: a), "config": (W, lambda a, b: 2 * a)},
    "anti": {"cagrad": (S, lambda a, b: 0 * a), "nash_mtl": (S, lambda a, b: 0 * a),
             "aligned_mtl": (W, lambda a, b: 0 * a), "config": (W, lambda a, b: 0 * a)},
    "b_zero": {"cagrad": (D, lambda a, b: 0 * a), "nash_mtl": (D, lambda a, b: a / a.norm()),
               "aligned_mtl": (D, lambda a, b: a / 2), "config": (D, lambda a, b: a)},
    "a_zero": {"cagrad": (D, lambda a, b: 0 * b), "nash_mtl": (D, lambda a, b: b / b.norm()),
               "aligned_mtl": (D, lambda a, b: b / 2), "config": (D, lambda a, b: b)},
    "both_zero": {r: (D, lambda a, b: 0 * a) for r in RULES_B},
}


@pytest.mark.parametrize("kind", list(EDGES))
@pytest.mark.parametrize("rule", RULES_B)
def test_edges_on_every_backend_and_as_torchjd(any_backend, kind, rule):
    name, device = any_backend
    a, b = _edge(kind)
    case, want = EDGES[kind][rule]
    res = pareto_lora.integrate(a.float().to(device), b.float().to(device), torch.tensor([0, a.numel()]), rule=rule,
                                backend=name)
    assert int(res.cases[0]) == case
    torch.testing.assert_close(res.out.cpu().double(), want(a, b), rtol=1e-5, atol=1e-6)
    agg = aggregator(rule)
    if not (kind == "both_zero" and rule == "nash_mtl"):  # torchjd's solver raises on a zero Gram
        torch.testing.assert_close(aggregate(agg, a, b), want(a, b), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rule", RULES_B)
def test_nan_segment_and_huge_ratio(any_backend, rule):
    """A NaN in one segment makes that segment NONFINITE (plain sum) and leaves the others as alone;
    a 1e6 norm ratio stays finite and equal to the reference."""
    name, device = any_backend
    a1, b1 = pair(1.0, 1e-6, 0.4, seed=1, n=100)
    a2, b2 = pair(1.0, 0.8, -0.5, seed=2, n=100)
    a, b = torch.cat([a1, a2, a2]).float(), torch.cat([b1, b2, b2]).float()
    a[250] = float("nan")
    res = pareto_lora.integrate(a.to(device), b.to(device), torch.tensor([0, 100, 200, 300]), rule=rule, backend=name)
    assert int(res.cases[2]) == Case.NONFINITE
    assert bool(torch.isfinite(res.out[:200]).all())
    for s, (x, y) in enumerate(((a1, b1), (a2, b2))):
        out, _, case = ours(x.float(), y.float(), rule)
        assert int(res.cases[s]) == case
        torch.testing.assert_close(res.out[100 * s:100 * (s + 1)].cpu(), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", RULES_B)
def test_scale(any_backend, rule):
    """Every rule is positively homogeneous of degree 1 (out(k a, k b) = k out(a, b)) except
    nash_mtl, of degree 0 (its output has norm min(sqrt 2, max_norm) at every scale)."""
    name, device = any_backend
    a, b = pair(1.0, 0.4, -0.2, n=64)
    base, _, _ = ours(a.float().to(device), b.float().to(device), rule, backend=name)
    for k in (1e-4, 1e3):
        out, _, _ = ours((k * a).float().to(device), (k * b).float().to(device), rule, backend=name)
        degree = 0 if rule == "nash_mtl" else 1
        torch.testing.assert_close(out.cpu().double(), k**degree * base.cpu().double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("rule", RULES_B)
def test_swap_symmetry(any_backend, rule):
    """Swapping a and b swaps (alpha, beta): none of the four prefers an objective."""
    name, device = any_backend
    gen = torch.Generator().manual_seed(5)
    na, nb, cos = torch.rand(3, 300, generator=gen, dtype=torch.float64)
    na, cos = 10.0 ** (6 * na - 3), 2 * cos - 1
    stats = torch.stack([na * na, nb * nb, cos * na * nb], 1)
    stats[:4] = torch.tensor([[1.0, 1.0, -1.0], [1.0, 0.0, 0.0], [4.0, 1.0, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    c1, k1 = pareto_lora.rule_coefficients(stats.to(device), rule, backend=name)
    c2, k2 = pareto_lora.rule_coefficients(stats[:, [1, 0, 2]].to(device), rule, backend=name)
    assert torch.equal(k1.cpu(), k2.cpu())
    torch.testing.assert_close(c1.cpu(), c2.cpu().flip(1), rtol=1e-6, atol=0)


# ---- 2. norm bounds, also on statistics with rounding error -----------------------------------------------
def bound(rule, na, nb, nsum, spec):
    """The largest ||out|| the rule may give (docs/rules.md, the gradient-manipulation family), with the statistics' error."""
    if rule == "cagrad":  # ||g0 + c ||g0|| g/||g|| || <= (1 + c) ||g0||; 1.031: ||g|| within STATIONARY_REL
        return (1.0 + 1.031 * spec.c) * nsum / 2
    if rule == "nash_mtl":
        return 1.031 * (min(math.sqrt(2.0), spec.max_norm) if spec.max_norm > 0 else math.sqrt(2.0))
    if rule == "aligned_mtl":
        return 0.5 * (na + nb)
    return na + nb  # config: (||a|| + ||b||)/2 ||a/||a|| + b/||b||||


@st.composite
def noisy_problems(draw):
    rule = draw(st.sampled_from(RULES_B))
    e = draw(st.floats(-6, 6))
    na, nb = 10.0 ** draw(st.floats(-3, 3)), 10.0 ** draw(st.floats(-3, 3)) * 10.0**e
    cos = draw(st.one_of(st.floats(-1, 1), st.sampled_from([-1.0, 1.0]),
                         st.floats(-1, 1).map(lambda t: math.copysign(1 - 10 ** (-9 + 8 * abs(t)), t))))
    noise = [draw(st.floats(-1, 1)) * STATS_REL_ERR for _ in range(3)]
    c, max_norm = draw(st.sampled_from([0.0, 0.4, 0.9, 2.0])), draw(st.sampled_from([0.0, 0.5, 1.0]))
    spec = RuleSpec(rule, c=c, max_norm=max_norm)
    return rule, na, nb, cos, noise, spec, draw(st.integers(0, 2**20))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=noisy_problems())
def test_bounds_hold_on_statistics_with_rounding_error(any_backend, problem):
    """The rule sees statistics off by up to STATS_REL_ERR (each) and its coefficients are applied to
    the true a, b: the bound must still hold, so nothing is divided by rounding noise."""
    name, device = any_backend
    rule, na, nb, cos, noise, spec, seed = problem
    a, b = pair(na, nb, cos, seed, n=16)
    aa, bb, ab = float(a @ a), float(b @ b), float(a @ b)
    stats = torch.tensor([[aa * (1 + noise[0]), bb * (1 + noise[1]), ab + noise[2] * math.sqrt(aa * bb)]],
                         dtype=torch.float64)
    coeffs, cases = pareto_lora.rule_coefficients(stats.to(device), spec, backend=name)
    alpha, beta = (float(v) for v in coeffs[0].double().cpu())
    if int(cases[0]) == Case.NONFINITE:  # a.b beyond Cauchy-Schwarz after the noise: the plain sum
        assert (alpha, beta) == (1.0, 1.0)
        return
    out = float((alpha * a + beta * b).norm())
    slack = 1e-6 * (abs(alpha) * na + abs(beta) * nb)  # float32 coefficients
    assert out <= bound(rule, na, nb, float((a + b).norm()), spec) * (1 + 1e-9) + slack, (rule, na, nb, cos, spec)


def test_cagrad_norm_eps_is_the_same_in_cpp_and_python():
    text = (pathlib.Path(__file__).parents[1] / "csrc" / "rule.h").read_text()
    assert float(re.search(r"constexpr double kCagradNormEps = ([^;]+);", text).group(1)) == CAGRAD_NORM_EPS



"""cagrad, nash_mtl, aligned_mtl and config: torchjd parity, the edges and the norm bounds.

torchjd[full] 0.18.0 is a test dependency: its aggregators on the 2-row matrix [a; b] are compared
with our float64 reference (which every kernel backend matches: tests/test_ops.py). Each tolerance
is justified where it is used, and every place where we differ from torchjd by design
(docs/rules_family_b.md, "Where we differ from torchjd") is pinned by its own test below.
"""

import math
import pathlib
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchjd.aggregation import AlignedMTL, CAGrad, CAGradWeighting, ConFIG, NashMTL

import pareto_lora
from pareto_lora import Case, RuleSpec
from pareto_lora.rules import CAGRAD_NORM_EPS, CAUCHY_SCHWARZ_SLACK, STATS_REL_ERR

RULES_B = ("cagrad", "nash_mtl", "aligned_mtl", "config")
N = 24  # entries per gradient: enough for any angle, small enough for cvxpy


def _pair(na, nb, cos, seed=0, n=N):
    """float64 a, b with ||a|| = na, ||b|| = nb and cos(a, b) = cos (exactly up to rounding)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    x = x / x.norm()
    y = y - (y @ x) * x
    y = y / y.norm()
    return na * x, nb * (cos * x + math.sqrt(max(1.0 - cos * cos, 0.0)) * y)


def _ours(a, b, rule, backend="reference", **kw):
    """(out, (alpha, beta), case) of one segment; float64 inputs keep float64 coefficients."""
    res = pareto_lora.integrate(a, b, torch.tensor([0, a.numel()]), rule=rule, backend=backend, **kw)
    return res.out, res.coeffs[0], int(res.cases[0])


def _torchjd(agg, a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's solver chatter
        return agg(torch.stack([a, b]))


def _samples(count, seed):
    """(||a||, ||b||, cos): norms log-uniform over 1e-2.5 .. 1e2.5 times a ratio up to 1e3 either way
    (so from ~3e-6 to ~3e5), angles uniform plus a share near +-1."""
    rng = np.random.default_rng(seed)
    near = [1 - 1e-3, 1 - 1e-6, -1 + 1e-3, -1 + 1e-6, 1 - 1e-9, -1 + 1e-9]
    for i in range(count):
        na = 10 ** rng.uniform(-2.5, 2.5)
        nb = na * 10 ** rng.uniform(-3, 3)
        cos = float(near[i % len(near)]) if i % 5 == 0 else float(rng.uniform(-1, 1))
        yield na, nb, cos, i


# ---- 1. parity with torchjd ------------------------------------------------------------------------------
def test_config_matches_torchjd_everywhere():
    """Closed form vs torchjd's pinv: both exact, float64 rounding only (1e-9 of ||a|| + ||b||).
    Includes the zero rows (torchjd's nan_to_num: the other row, our plain sum)."""
    cases = [*_samples(120, 1), (1.0, 0.0, 0.3, 0), (0.0, 2.0, 0.3, 0), (0.0, 0.0, 0.0, 0)]
    for na, nb, cos, seed in cases:
        a, b = _pair(na, nb, cos, seed)
        out, _, _ = _ours(a, b, "config")
        assert float((out - _torchjd(ConFIG(), a, b)).norm()) <= 1e-9 * (na + nb) + 1e-300, (na, nb, cos)


def test_aligned_mtl_matches_torchjd_outside_the_rank_one_band():
    """Exact closed form vs torchjd's eigh (float64): 1e-9 of ||a|| + ||b||. The band
    |cos| >= 1 - CAUCHY_SCHWARZ_SLACK is rank 1 for us (pinned below), rank 2 for torchjd's eigh."""
    checked = 0
    for na, nb, cos, seed in _samples(120, 2):
        if abs(cos) >= 1.0 - CAUCHY_SCHWARZ_SLACK:
            continue
        a, b = _pair(na, nb, cos, seed)
        out, _, case = _ours(a, b, "aligned_mtl")
        assert case == Case.WEIGHTED
        assert float((out - _torchjd(AlignedMTL(), a, b)).norm()) <= 1e-9 * (na + nb), (na, nb, cos)
        checked += 1
    assert checked >= 90


def test_aligned_mtl_rank_one_band_and_exact_rank_one():
    """Within rounding of parallel (|cos| >= 1 - 4 2^-20) we take torchjd's rank-1 branch: the mean's
    component along the top direction. torchjd takes it only below its eigh tolerance (2 eps l_max);
    in between, its rank-2 output sqrt(l_min/2) is made of the angle's last digits. At exact rank 1
    (b = -0.5 a in float64, or a zero row) both agree."""
    a, b = _pair(2.0, 1.0, 1.0 - 1e-9)
    out, _, case = _ours(a, b, "aligned_mtl")
    assert case == Case.WEIGHTED
    top = torch.linalg.svd(torch.stack([a, b]), full_matrices=False).Vh[0]  # the top direction of [a; b]
    torch.testing.assert_close(out, ((a + b) / 2 @ top) * top, rtol=0, atol=1e-9)
    assert float(_torchjd(AlignedMTL(), a, b).norm()) < 1e-3 * float(out.norm())  # torchjd: near zero
    for b in (-0.5 * a, 0.0 * a):
        out, _, _ = _ours(a, b, "aligned_mtl")
        torch.testing.assert_close(out, _torchjd(AlignedMTL(), a, b), rtol=1e-12, atol=1e-15)


def _cagrad_x(coeffs):
    # alpha = 1/2 + r x, beta = 1/2 + r (1 - x): the point x of the CAGrad sub-problem
    da, db = float(coeffs[0]) - 0.5, float(coeffs[1]) - 0.5
    return da / (da + db) if da + db > 0 else 0.5


def _cagrad_objective(x, gram, c):
    # torchjd's cost on the trace-normalised Gram: w.G 1/2 + c ||g0|| ||g_w||
    g = gram / gram.trace()
    w = np.array([x, 1 - x])
    return float(w @ g @ np.full(2, 0.5) + c * math.sqrt(np.full(2, 0.5) @ g @ np.full(2, 0.5)) * math.sqrt(max(w @ g @ w, 0)))


@pytest.mark.parametrize("c", [0.1, 0.4, 0.9])
def test_cagrad_matches_torchjd_within_its_solver_tolerance(c):
    """torchjd solves the sub-problem with Clarabel (tol_gap 1e-8 on an objective of order 1). Ours is
    the exact minimiser: its objective is never above torchjd's by more than that tolerance, and
    as the objective is flat at its minimum a gap eps moves the point by O(sqrt(eps)), and the output
    g0 + c ||g0|| g/||g|| moves with (1 + c) times it: the outputs agree to sqrt(1e-8) (1 + c) of
    ||a|| + ||b|| (measured: 4e-5 at worst, c = 0.9)."""
    checked = 0
    for na, nb, cos, seed in _samples(60, 3):
        if na * na + nb * nb < CAGRAD_NORM_EPS:  # torchjd's absolute trace epsilon (pinned below)
            continue
        a, b = _pair(na, nb, cos, seed)
        out, coeffs, case = _ours(a, b, "cagrad", c=c)
        ref = _torchjd(CAGrad(c=c), a, b)
        assert float((out - ref).norm()) <= 1e-4 * (1 + c) * (na + nb), (na, nb, cos)
        if case == Case.WEIGHTED:
            gram = torch.stack([a, b]) @ torch.stack([a, b]).T
            w = CAGradWeighting(c=c)(gram).double()
            assert _cagrad_objective(_cagrad_x(coeffs), gram.numpy(), c) <= _cagrad_objective(
                _cagrad_x(w), gram.numpy(), c) + 1e-8
        checked += 1
    assert checked >= 50


def test_cagrad_is_scale_invariant_where_torchjd_returns_zero():
    """torchjd returns 0 when ||a||^2 + ||b||^2 < norm_eps = 1e-4 (an absolute epsilon; LoRA groups live
    there). Ours keeps the direction: out(s a, s b) = s out(a, b), and out(a, b) matches torchjd."""
    a, b = _pair(1.0, 0.7, -0.3)
    out, _, _ = _ours(a, b, "cagrad")
    torch.testing.assert_close(out, _torchjd(CAGrad(c=0.4), a, b), rtol=1e-4, atol=1e-6)
    s = 1e-3
    assert float(_torchjd(CAGrad(c=0.4), s * a, s * b).norm()) == 0.0
    small, _, case = _ours(s * a, s * b, "cagrad")
    assert case == Case.WEIGHTED
    torch.testing.assert_close(small, s * out, rtol=1e-12, atol=0)


def test_cagrad_relative_norm_eps_is_torchjds():
    """The other epsilon of torchjd's CAGrad is relative (||g_w|| < 1e-4 of the trace-normalised
    norm: Pareto-stationary, zero output): kept. b = 1e-6 a (rotated): both return 0."""
    a, b = _pair(1.0, 1e-6, 0.3)
    out, _, case = _ours(a, b, "cagrad")
    assert case == Case.STATIONARY and float(out.norm()) == 0.0
    assert float(_torchjd(CAGrad(c=0.4), a, b).norm()) == 0.0


def test_cagrad_with_c_at_least_one_near_anti_parallel():
    """With c >= 1 the CAGrad point is the min-norm point of the hull; near anti-parallel rows it is
    made of the rows' last digits. Where ||g|| is within the statistics' rounding (STATIONARY_REL,
    mmpareto's test) we return 0 (Pareto-stationary), torchjd g0 + c ||g0|| g/||g|| with that
    direction. Away from it, parity holds for c >= 1 too."""
    a, b = _pair(1.0, 3.0, -1.0 + 2e-6)  # ||g|| ~ 1.5e-3: above torchjd's norm_eps, within the rounding
    out, _, case = _ours(a, b, "cagrad", c=2.0)
    assert case == Case.STATIONARY and float(out.norm()) == 0.0
    assert float(_torchjd(CAGrad(c=2.0), a, b).norm()) > 1.0
    a, b = _pair(1.0, 3.0, -0.9)
    out, _, _ = _ours(a, b, "cagrad", c=2.0)
    assert float((out - _torchjd(CAGrad(c=2.0), a, b)).norm()) <= 1e-4 * (1 + 2.0) * 4.0


def _nash_residual(agg, a, b):
    # How far torchjd's own weights w are from the Nash condition w_i (G w)_i = 1 (before clipping).
    w = np.asarray(agg.weighting.prvs_alpha, dtype=np.float64)
    j = torch.stack([a, b]).numpy()
    return float(np.max(np.abs(w * (j @ j.T @ w) - 1.0)))


def test_nash_mtl_matches_torchjd_where_its_solver_converged():
    """torchjd iterates a convex approximation (ECOS, 20 iterations from w = 1, a stop test on the
    Frobenius-normalised Gram) and often stops short: outside moderate norms and ratios its w is far
    from the Nash condition. Ours solves G w = 1/w exactly. The justified tolerance is torchjd's own
    residual rho = max_i |w_i (G w)_i - 1| on its result: ||ours - torchjd|| <= rho ||ours|| (measured
    <= 0.49 rho). Compared where rho < 0.1; at least half the samples qualify."""
    close = 0
    samples = list(_samples(48, 4))
    for na, nb, cos, seed in samples:
        if 2.0 + 2.0 * cos <= 4.0 * pareto_lora.rules.STATIONARY_REL:  # our STATIONARY band (pinned below)
            continue
        a, b = _pair(na, nb, cos, seed)
        agg = NashMTL(n_tasks=2)  # stateful: a fresh one per comparison
        ref = _torchjd(agg, a, b)
        rho = _nash_residual(agg, a, b)
        if rho >= 0.1:
            continue
        out, _, case = _ours(a, b, "nash_mtl")
        assert case == Case.WEIGHTED
        assert float((out - ref).norm()) <= rho * float(out.norm()) + 1e-12, (na, nb, cos, rho)
        close += 1
    assert close >= len(samples) // 2


def test_nash_mtl_is_the_exact_nash_point_where_torchjd_stops_early():
    """a = b at norm 0.01: torchjd's stop test, on the normalised Gram, accepts its start w = (1, 1)
    (rho ~ 1) and returns a + b. Ours satisfies w_i (G w)_i = 1 to rounding (max_norm=0: unclipped)."""
    a, b = _pair(0.01, 0.01, 1.0)
    agg = NashMTL(n_tasks=2, max_norm=0.0)
    torch.testing.assert_close(_torchjd(agg, a, b), a + b)
    assert _nash_residual(agg, a, b) > 0.5
    for na, nb, cos in ((0.01, 0.01, 1.0), (3e-4, 20.0, -0.6), (1e2, 1e5, 0.2)):
        a, b = _pair(na, nb, cos)
        _, w, _ = _ours(a, b, "nash_mtl", max_norm=0.0)
        gram = torch.stack([a, b]) @ torch.stack([a, b]).T
        torch.testing.assert_close(w * (gram @ w), torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=0)


def test_nash_mtl_anti_parallel_is_stationary():
    """a = -b (any norms) has no Nash point (G w = 1/w needs w > 0 with G w > 0). torchjd returns 0
    for equal norms and an unconverged vector otherwise; within rounding of anti-parallel
    (1 + cos <= 2 STATIONARY_REL) ours is 0, STATIONARY. Just outside, the unit-norm result."""
    for a, b in (_pair(1.0, 1.0, -1.0), _pair(1.0, 0.5, -1.0), _pair(3.0, 2.0, -1.0 + 1e-6)):
        out, _, case = _ours(a, b, "nash_mtl")
        assert case == Case.STATIONARY and float(out.norm()) == 0.0
    out, _, case = _ours(*_pair(3.0, 2.0, -1.0 + 1e-4), "nash_mtl")
    assert case == Case.WEIGHTED
    torch.testing.assert_close(out.norm(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1.0, 3.0])
def test_nash_mtl_max_norm_is_torchjds(max_norm):
    """||out|| = sqrt 2 at the Nash point, clipped to max_norm (0: no clipping), as torchjd."""
    a, b = _pair(1.0, 1.5, 0.2)
    out, _, _ = _ours(a, b, "nash_mtl", max_norm=max_norm)
    want = math.sqrt(2.0) if max_norm == 0 else min(math.sqrt(2.0), max_norm)
    assert abs(float(out.norm()) - want) < 1e-12
    ref = _torchjd(NashMTL(n_tasks=2, max_norm=max_norm), a, b)
    assert float((out - ref).norm()) <= 1e-6 * want


# ---- 2. the edges, on every backend ------------------------------------------------------------------------
def _edge(kind):
    a, _ = _pair(2.0, 1.0, 0.0, seed=7, n=257)
    return {"identical": (a, a.clone()), "anti": (a, -a), "b_zero": (a, 0 * a), "a_zero": (0 * a, a),
            "both_zero": (0 * a, 0 * a)}[kind]


EDGES = {  # kind -> rule -> (case, out as a function of a, b)
    "identical": {"cagrad": (Case.WEIGHTED, lambda a, b: 1.4 * a), "nash_mtl": (Case.WEIGHTED, lambda a, b: a / a.norm()),
                  "aligned_mtl": (Case.WEIGHTED, lambda a, b: a), "config": (Case.WEIGHTED, lambda a, b: 2 * a)},
    "anti": {"cagrad": (Case.STATIONARY, lambda a, b: 0 * a), "nash_mtl": (Case.STATIONARY, lambda a, b: 0 * a),
             "aligned_mtl": (Case.WEIGHTED, lambda a, b: 0 * a), "config": (Case.WEIGHTED, lambda a, b: 0 * a)},
    "b_zero": {"cagrad": (Case.DEGENERATE, lambda a, b: 0 * a), "nash_mtl": (Case.DEGENERATE, lambda a, b: a / a.norm()),
               "aligned_mtl": (Case.DEGENERATE, lambda a, b: a / 2), "config": (Case.DEGENERATE, lambda a, b: a)},
    "a_zero": {"cagrad": (Case.DEGENERATE, lambda a, b: 0 * b), "nash_mtl": (Case.DEGENERATE, lambda a, b: b / b.norm()),
               "aligned_mtl": (Case.DEGENERATE, lambda a, b: b / 2), "config": (Case.DEGENERATE, lambda a, b: b)},
    "both_zero": {r: (Case.DEGENERATE, lambda a, b: 0 * a) for r in RULES_B},
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
    agg = {"cagrad": CAGrad(c=0.4), "nash_mtl": NashMTL(n_tasks=2), "aligned_mtl": AlignedMTL(), "config": ConFIG()}[rule]
    if not (kind == "both_zero" and rule == "nash_mtl"):  # torchjd's solver raises on a zero Gram
        torch.testing.assert_close(_torchjd(agg, a, b), want(a, b), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rule", RULES_B)
def test_nan_segment_and_huge_ratio(any_backend, rule):
    """A NaN in one segment makes that segment NONFINITE (plain sum) and leaves the others as alone;
    a 1e6 norm ratio stays finite and equal to the reference."""
    name, device = any_backend
    a1, b1 = _pair(1.0, 1e-6, 0.4, seed=1, n=100)
    a2, b2 = _pair(1.0, 0.8, -0.5, seed=2, n=100)
    a, b = torch.cat([a1, a2, a2]).float(), torch.cat([b1, b2, b2]).float()
    a[250] = float("nan")
    res = pareto_lora.integrate(a.to(device), b.to(device), torch.tensor([0, 100, 200, 300]), rule=rule, backend=name)
    assert int(res.cases[2]) == Case.NONFINITE
    assert bool(torch.isfinite(res.out[:200]).all())
    for s, (x, y) in enumerate(((a1, b1), (a2, b2))):
        out, _, case = _ours(x.float(), y.float(), rule)
        assert int(res.cases[s]) == case
        torch.testing.assert_close(res.out[100 * s:100 * (s + 1)].cpu(), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", RULES_B)
def test_scale(any_backend, rule):
    """Every rule is positively homogeneous of degree 1 (out(k a, k b) = k out(a, b)) except
    nash_mtl, of degree 0 (its output has norm min(sqrt 2, max_norm) at every scale)."""
    name, device = any_backend
    a, b = _pair(1.0, 0.4, -0.2, n=64)
    base, _, _ = _ours(a.float().to(device), b.float().to(device), rule, backend=name)
    for k in (1e-4, 1e3):
        out, _, _ = _ours((k * a).float().to(device), (k * b).float().to(device), rule, backend=name)
        degree = 0 if rule == "nash_mtl" else 1
        torch.testing.assert_close(out.cpu().double(), k**degree * base.cpu().double(), rtol=1e-5, atol=0)


# ---- 3. norm bounds, also on statistics with rounding error -----------------------------------------------
def bound(rule, na, nb, nsum, spec):
    """The largest ||out|| the rule may give (docs/rules_family_b.md), with the statistics' error."""
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
    spec = RuleSpec(rule, c=draw(st.sampled_from([0.0, 0.4, 0.9, 2.0])), max_norm=draw(st.sampled_from([0.0, 0.5, 1.0])))
    return rule, na, nb, cos, noise, spec, draw(st.integers(0, 2**20))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=noisy_problems())
def test_bounds_hold_on_statistics_with_rounding_error(any_backend, problem):
    """The rule sees statistics off by up to STATS_REL_ERR (each) and its coefficients are applied to
    the true a, b: the bound must still hold, so nothing is divided by rounding noise."""
    name, device = any_backend
    rule, na, nb, cos, noise, spec, seed = problem
    a, b = _pair(na, nb, cos, seed, n=16)
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


# ---- 4. a tiny PEFT model, group by group ------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    import models

    return models.lora_llama(num_layers=3)


def _torchjd_tolerance(rule, agg, a, b, out):
    """The parity tolerance of section 1 for one group (plus the float32 model's 2e-5)."""
    scale = float(a.norm() + b.norm())
    if rule == "cagrad":
        return 1e-4 * 1.4 * scale + 2e-5 * scale
    if rule == "nash_mtl":
        return _nash_residual(agg, a, b) * float(out.norm()) + 2e-5
    return 2e-5 * scale


@pytest.mark.parametrize("rule", RULES_B)
def test_peft_model_per_group_equals_torchjd(llama, rule):
    """ParetoLoRA on a tiny LoRA Llama, one layer per group: each group's gradient is torchjd's aggregate
    of that group's 2-row Jacobian [g_text; g_image] from plain autograd. The losses are scaled by 100
    so that every group's trace is above torchjd's absolute norm_eps (cagrad; difference 1)."""
    import models
    from pareto_lora.training import ParetoLoRA

    def losses():
        out = llama(**models.model_inputs(batch))
        lt, li = pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])
        return 100.0 * lt, 300.0 * li

    batch = models.token_batch(seed=4)
    named = [(n, p) for n, p in llama.named_parameters() if p.requires_grad]
    lt, li = losses()
    text = torch.autograd.grad(lt, [p for _, p in named], retain_graph=True)
    image = torch.autograd.grad(li, [p for _, p in named])
    layer = {n: int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n, _ in named}
    report = ParetoLoRA(llama, rule=rule, num_groups=3, modulate="all").backward(*losses())
    compared = 0
    for g in range(3):
        idx = [i for i, (n, _) in enumerate(named) if layer[n] == g]
        a = torch.cat([text[i].reshape(-1) for i in idx]).double()
        b = torch.cat([image[i].reshape(-1) for i in idx]).double()
        got = torch.cat([named[i][1].grad.reshape(-1) for i in idx]).double()
        agg = {"cagrad": CAGrad(c=0.4), "nash_mtl": NashMTL(n_tasks=2), "aligned_mtl": AlignedMTL(), "config": ConFIG()}[rule]
        want = _torchjd(agg, a, b)
        assert report.cases[g] == Case.WEIGHTED
        if rule == "nash_mtl" and _nash_residual(agg, a, b) >= 0.1:
            continue  # torchjd's solver stopped short (section 1); the exact Nash point is tested there
        assert float((got - want).norm()) <= _torchjd_tolerance(rule, agg, a, b, got), (rule, g)
        compared += 1
    assert compared >= 2
    llama.zero_grad(set_to_none=True)

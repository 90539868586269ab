"""Property-based suite (hypothesis, seeded, fixed example budget): random segment layouts with
empty and 1-element segments, magnitudes from 1e-30 to 1e19, near-parallel and near-anti-parallel
pairs, every rule, float32/bfloat16/float16, on every backend present. Each example checks the
statistics against float64, the rule against the reference on the same statistics, and the
norm bound each rule promises (docs/rules.md): no rule may amplify rounding noise."""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pareto_lora  # noqa: E402
from pareto_lora import Case, reference  # noqa: E402
from pareto_lora.rules import STATS_REL_ERR  # noqa: E402

# Magnitudes each dtype can hold with room for a sum of a few hundred squares' square root.
EXPONENTS = {torch.float32: (-30, 19), torch.bfloat16: (-30, 19), torch.float16: (-3, 3)}
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
RELATIONS = ("random", "parallel", "anti_parallel", "orthogonalish")


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(list(EXPONENTS)))
    lo, hi = EXPONENTS[dtype]
    sizes = draw(st.lists(st.sampled_from([0, 1, 2, 5, 17, 64, 300]), min_size=1, max_size=8))
    segments = []
    for _ in sizes:
        segments.append(
            (
                draw(st.integers(lo, hi)),  # log10 of |a|'s element scale
                draw(st.integers(lo, hi)),  # ... of |b|'s
                draw(st.sampled_from(RELATIONS)),
                draw(st.sampled_from([0.0, 1e-9, 1e-5, 1e-4, 3e-4, 1e-3, 1e-2])),  # distance from (anti)parallel
            )
        )
    rule = draw(st.sampled_from(pareto_lora.RULES))
    symmetric = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, sizes, segments, rule, symmetric, seed


def build(sizes, segments, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    parts_a, parts_b = [], []
    for n, (ea, eb, relation, wiggle) in zip(sizes, segments):
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        y = torch.randn(n, generator=gen, dtype=torch.float64)
        if relation == "parallel":
            y = x + wiggle * y
        elif relation == "anti_parallel":
            y = -x + wiggle * y
        elif relation == "orthogonalish":
            y = y - (y @ x) / max(float(x @ x), 1e-300) * x + wiggle * x
        parts_a.append(x * 10.0**ea)
        parts_b.append(y * 10.0**eb)
    a = torch.cat(parts_a).to(dtype)
    b = torch.cat(parts_b).to(dtype)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    return a, b, offsets


def rule_bound(rule, na, nb, nsum, case, gamma):
    """The largest ||out|| the rule may produce on a segment (before output rounding)."""
    if rule == "nash_mtl" and case in (Case.WEIGHTED, Case.DEGENERATE):  # unit scale (max_norm 1), any input norm
        return 1.031
    if rule == "cagrad" and case == Case.WEIGHTED:  # (1 + c) ||a + b||/2, c = 0.4; 1.031: STATIONARY_REL
        return (1.0 + 1.031 * 0.4) * nsum / 2
    if case in (Case.SUMMED, Case.INACTIVE, Case.DEGENERATE, Case.NONFINITE) and rule != "mmpareto":
        return na + nb
    if case == Case.STATIONARY:
        return 0.0
    if rule in ("mean", "upgrad", "dualproj", "aligned_mtl"):  # docs/rules.md, the gradient-manipulation family
        return 0.5 * (na + nb)
    if rule == "imtl_g":
        return 2.0 * na * nb / (na + nb)
    if rule == "pcgrad":
        return na + nb
    if rule == "mmpareto":
        return 1.031 * gamma * nsum
    if case == Case.PARETO:  # a convex combination's min-norm point is no longer than either end
        return min(na, nb)
    if case == Case.RESCALED:
        return 2.0 * max(na, nb)
    return na + nb


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_random_problems_agree_with_float64_and_keep_every_rule_bound(any_backend, problem):
    name, device = any_backend
    dtype, sizes, segments, rule, symmetric, seed = problem
    a, b, offsets = build(sizes, segments, dtype, seed)
    gamma = 1.5
    res = pareto_lora.integrate(a.to(device), b.to(device), offsets, rule=rule, gamma=gamma, symmetric=symmetric,
                                backend=name)
    a64, b64 = a.double(), b.double()
    # statistics: exact products summed in float64
    want = reference.segment_stats(a64, b64, offsets)
    scale = torch.stack([want[:, 0], want[:, 1], (want[:, 0] * want[:, 1]).sqrt()], 1)
    rel = 1e-12
    if dtype != torch.float32:  # bf16/fp16: float32 blocks in the C++ CPU op, the stated bound
        scale, rel = reference.segment_stats(a64.abs(), b64.abs(), offsets), STATS_REL_ERR
    assert bool(((res.stats.cpu() - want).abs() <= rel * scale + 1e-300).all())
    # the rule: the reference's decisions and coefficients on the same statistics
    ref_c, ref_k = pareto_lora.rule_coefficients(res.stats.cpu(), rule, gamma=gamma, symmetric=symmetric, backend="reference")
    assert res.cases.cpu().tolist() == ref_k.tolist()
    torch.testing.assert_close(res.coeffs.cpu(), ref_c, rtol=1e-6, atol=0)
    # the bound, segment by segment, up to one rounding of the output per element
    out = res.out.double().cpu()
    assert bool(torch.isfinite(out).all())
    coeffs = res.coeffs.double().cpu()
    for s in range(len(sizes)):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        if hi == lo:
            continue
        x, y, o = a64[lo:hi], b64[lo:hi], out[lo:hi]
        na, nb, nsum = float(x.norm()), float(y.norm()), float((x + y).norm())
        bound = rule_bound(rule, na, nb, nsum, Case(int(res.cases[s])), gamma)
        alpha, beta = coeffs[s].tolist()
        rounding = 2 * EPS[dtype] * float((abs(alpha) * x.abs() + abs(beta) * y.abs()).norm())
        assert float(o.norm()) <= bound * (1 + 1e-6) + rounding + 1e-300, (s, rule, Case(int(res.cases[s])))
        assert math.isfinite(alpha) and math.isfinite(beta)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_float32_statistics_from_elsewhere_never_make_a_rule_amplify_noise(any_backend, problem):
    """Statistics summed in float32 (e.g. across ranks by hand) carry 2^-24 errors: the rule's
    coefficients, applied to the true vectors, still keep the rule's bound."""
    name, device = any_backend
    dtype, sizes, segments, rule, symmetric, seed = problem
    a, b, offsets = build(sizes, segments, torch.float32, seed)
    a64, b64 = a.double(), b.double()
    stats64 = reference.segment_stats(a64, b64, offsets)
    stats32 = stats64.float()
    # Their error relative to (||a||^2, ||b||^2, ||a|| ||b||): 2^-24, more where a square is a float32 subnormal.
    scale = torch.stack([stats64[:, 0], stats64[:, 1], (stats64[:, 0] * stats64[:, 1]).sqrt()], 1)
    stats_err = ((stats32.double() - stats64).abs() / scale.clamp_min(1e-300)).amax(1)
    coeffs, cases = pareto_lora.rule_coefficients(stats32.to(device), rule, gamma=1.5, symmetric=symmetric,
                                                  backend=name)
    ref_c, ref_k = pareto_lora.rule_coefficients(stats32, rule, gamma=1.5, symmetric=symmetric, backend="reference")
    assert cases.cpu().tolist() == ref_k.tolist()
    coeffs = coeffs.double().cpu()
    for s in range(len(sizes)):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        if hi == lo:
            continue
        x, y = a64[lo:hi], b64[lo:hi]
        alpha, beta = coeffs[s].tolist()
        out = alpha * x + beta * y
        na, nb, nsum = float(x.norm()), float(y.norm()), float((x + y).norm())
        bound = rule_bound(rule, na, nb, nsum, Case(int(cases[s])), 1.5)
        # slack for the float32 coefficients and the statistics' own error only: it must not grow with
        # the coefficients themselves (imtl_g's bound is reached at parallel pairs: its output moves
        # with the norms it is given)
        assert float(out.norm()) <= bound * (1 + 1e-5 + float(stats_err[s])) + 1e-300, (
            s, rule, Case(int(cases[s])), float(out.norm()) / max(bound, 1e-300))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), cuts=st.lists(st.integers(0, 8), max_size=4), poison=st.booleans())
def test_grouped_steps_sum_groups_in_one_order_and_keep_every_rule_bound(any_backend, problem, cuts, poison):
    """The fused op over a training step: random groups (empty ones included) of random layouts.
    Group statistics are the rows summed left to right (bitwise), the rule is the reference's on
    them, and each group's output keeps the rule's bound on the group's own vectors."""
    name, device = any_backend
    dtype, sizes, segments, rule, symmetric, seed = problem
    a, b, offsets = build(sizes, segments, dtype, seed)
    s = len(sizes)
    groups = torch.tensor([0, *sorted(min(c, s) for c in cuts), s])
    res = pareto_lora.integrate(a.to(device), b.to(device), offsets, rule=rule, gamma=1.5, symmetric=symmetric,
                                groups=groups, poison=torch.tensor(poison, device=device), backend=name)
    gs = res.group_stats.cpu()
    assert torch.equal(gs, reference.group_sums(res.stats.cpu(), groups))
    ref_c, ref_k = pareto_lora.rule_coefficients(gs, rule, gamma=1.5, symmetric=symmetric, backend="reference")
    torch.testing.assert_close(res.coeffs.cpu(), ref_c, rtol=1e-6, atol=0)
    if poison:
        assert bool(res.out.isnan().all()) and bool((res.cases == int(Case.NONFINITE)).all())
        return
    assert res.cases.cpu().tolist() == ref_k.tolist()
    out, a64, b64, coeffs = res.out.double().cpu(), a.double(), b.double(), res.coeffs.double().cpu()
    for g in range(groups.numel() - 1):
        lo, hi = int(offsets[groups[g]]), int(offsets[groups[g + 1]])
        if hi == lo:
            continue
        x, y, o = a64[lo:hi], b64[lo:hi], out[lo:hi]
        na, nb, nsum = float(x.norm()), float(y.norm()), float((x + y).norm())
        bound = rule_bound(rule, na, nb, nsum, Case(int(res.cases[g])), 1.5)
        alpha, beta = coeffs[g].tolist()
        rounding = 2 * EPS[dtype] * float((abs(alpha) * x.abs() + abs(beta) * y.abs()).norm())
        assert float(o.norm()) <= bound * (1 + 1e-6) + rounding + 1e-300, (g, rule, Case(int(res.cases[g])))

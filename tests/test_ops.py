"""Every kernel backend against the float64 reference: ops, rules, dtypes, segment layouts.

One parametrised suite for all backends (C++ CPU, CUDA, Triton): the `backend` fixture yields
(backend, device) pairs present on this machine.

Tolerances: stats are exact products summed in float64 inside the kernels, so they are compared
with the float64 reference on the same (upcast) inputs to 1e-12 relative to the segment's scale
(||a||^2, ||b||^2, ||a||*||b||); bf16/fp16 ones to STATS_REL_ERR of their sums of |products|
(the C++ CPU op sums those products in float32 blocks first). Coefficients are compared with the reference rule applied to the
kernel's own stats (the rule runs in float64 on every backend) to 1e-6. The combine is
compared with float64 arithmetic rounded to the output dtype: fp32 1e-6, fp16 1e-3, bf16 8e-3
relative to the element scale (one rounding of the output).
"""

import zlib

import pytest
import torch

import pareto_lora
from pareto_lora import Case, reference
from pareto_lora.rules import STATS_REL_ERR
from _inputs import make_pair, random_offsets, random_sizes

RULES = pareto_lora.RULES
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}

LAYOUTS = {
    "1seg": lambda g: [1001],
    "7seg_odd": lambda g: random_sizes(7, 300, g),
    "64seg_empties": lambda g: random_sizes(64, 200, g, empty_every=9),
    "tiny_segments": lambda g: [0, 1, 2, 3, 0, 5, 17, 1],
}


def assert_stats_close(stats, a, b, offsets):
    ref = reference.segment_stats(a.double(), b.double(), offsets)
    assert stats.dtype == torch.float64 and stats.shape == ref.shape
    scale = torch.stack([ref[:, 0], ref[:, 1], (ref[:, 0] * ref[:, 1]).sqrt()], dim=1)
    rel = 1e-12
    if a.dtype in (torch.bfloat16, torch.float16):
        # the C++ CPU op sums bf16/fp16 products in float32 blocks first: the stated bound,
        # STATS_REL_ERR of each statistic's sum of |products| (csrc/cpu/segment_kernels.h)
        scale, rel = reference.segment_stats(a.double().abs(), b.double().abs(), offsets), STATS_REL_ERR
    err = (stats.cpu() - ref.cpu()).abs()
    assert bool((err <= rel * scale.cpu() + 1e-300).all()), f"max err {err.max()}"


def assert_out_close(out, a, b, offsets, coeffs):
    ref = reference.combine(a.double(), b.double(), offsets, coeffs.double()).cpu()
    seg = reference.segment_ids(offsets, torch.device("cpu"))
    c = coeffs.double().cpu()
    scale = c[seg, 0].abs() * a.double().cpu().abs() + c[seg, 1].abs() * b.double().cpu().abs()
    err = (out.double().cpu() - ref).abs()
    tol = OUT_TOL[out.dtype]
    assert bool((err <= tol * scale + 1e-30).all()), f"max err {(err - tol * scale).max()}"


def run_integrate(backend, a, b, offsets, **kw):
    name, _ = backend
    return pareto_lora.integrate(a, b, offsets, backend=name, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rule", RULES)
def test_integrate_matches_reference(backend, rule, layout, dtype):
    name, device = backend
    gen = torch.Generator().manual_seed(zlib.crc32(f"{rule}{layout}{dtype}".encode()))
    offsets = random_offsets(LAYOUTS[layout](gen))
    numel = int(offsets[-1])
    a, b = make_pair(numel, dtype, device, gen, corr=float(torch.empty(1).uniform_(-0.5, 0.5, generator=gen)))
    g = offsets.numel() - 1
    active = torch.rand(g, generator=gen) > 0.3
    res = run_integrate(backend, a, b, offsets, rule=rule, tau=0.5, active=active.to(device), gamma=1.5)
    assert res.out.dtype == dtype and res.out.device.type == device
    assert_stats_close(res.stats, a, b, offsets)
    ref_coeffs, ref_cases = pareto_lora.rule_coefficients(res.stats.cpu(), rule, 0.5, active, 1.5, backend="reference")
    torch.testing.assert_close(res.coeffs.cpu(), ref_coeffs, rtol=1e-6, atol=0)
    assert torch.equal(res.cases.cpu(), ref_cases)
    assert_out_close(res.out, a, b, offsets, res.coeffs)


@pytest.mark.parametrize("numel", [0, 1, 7, 4099, 65537])
def test_integrate_end_to_end_vs_float64(backend, numel):
    """Whole pipeline against the float64 oracle on random data (no decision near a boundary)."""
    name, device = backend
    gen = torch.Generator().manual_seed(numel)
    cuts = sorted(torch.randint(0, numel + 1, (4,), generator=gen).tolist()) if numel >= 100 else []
    offsets = torch.tensor([0, *cuts, numel], dtype=torch.int64)
    a, b = make_pair(numel, torch.float32, device, gen)
    res = run_integrate(backend, a, b, offsets, rule="pareto_lora")
    out_ref, stats_ref, coeffs_ref, cases_ref = reference.integrate(a.double().cpu(), b.double().cpu(), offsets)
    assert torch.equal(res.cases.cpu(), cases_ref)
    torch.testing.assert_close(res.coeffs.cpu().double(), coeffs_ref, rtol=1e-4, atol=1e-6)
    if numel:
        rel = (res.out.cpu().double() - out_ref).norm() / out_ref.norm()
        assert rel < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_stats_and_combine_ops(backend, dtype):
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    offsets = random_offsets(random_sizes(13, 500, gen, empty_every=4))
    a, b = make_pair(int(offsets[-1]), dtype, device, gen)
    stats = pareto_lora.segment_stats(a, b, offsets, backend=name)
    assert_stats_close(stats, a, b, offsets)
    coeffs = torch.randn(13, 2, generator=gen).to(device)
    out = pareto_lora.combine(a, b, offsets, coeffs, backend=name)
    assert_out_close(out, a, b, offsets, coeffs)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rule_coefficients_op(backend, rule, symmetric):
    """The rule on stats of any source (random, zero, negative dot, non-finite)."""
    name, device = backend
    gen = torch.Generator().manual_seed(11)
    na, nb = torch.rand(40, generator=gen) * 3, torch.rand(40, generator=gen) * 3
    cos = torch.rand(40, generator=gen) * 2 - 1
    stats = torch.stack([na**2, nb**2, cos * na * nb], dim=1)
    stats[0] = 0
    stats[1, 0] = 0
    stats[2, 2] = float("nan")
    stats[3, 1] = float("inf")
    active = torch.rand(40, generator=gen) > 0.2
    coeffs, cases = pareto_lora.rule_coefficients(
        stats.to(device), rule, 0.7, active.to(device), 1.5, symmetric, backend=name
    )
    ref_c, ref_k = pareto_lora.rule_coefficients(stats, rule, 0.7, active, 1.5, symmetric, backend="reference")
    assert coeffs.dtype == torch.float32 and cases.dtype == torch.int32
    torch.testing.assert_close(coeffs.cpu(), ref_c, rtol=1e-6, atol=0)
    assert torch.equal(cases.cpu(), ref_k)


@pytest.mark.parametrize("target", ["a", "b"])
def test_in_place(backend, target):
    name, device = backend
    gen = torch.Generator().manual_seed(5)
    offsets = random_offsets([100, 0, 333])
    a, b = make_pair(433, torch.float32, device, gen)
    expected = pareto_lora.integrate(a, b, offsets, backend=name)
    a2, b2 = a.clone(), b.clone()
    out = a2 if target == "a" else b2
    res = pareto_lora.integrate(a2, b2, offsets, out=out, backend=name)
    assert res.out is out
    torch.testing.assert_close(out, expected.out, rtol=0, atol=0)


def test_deterministic_bitwise(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(9)
    offsets = random_offsets(random_sizes(20, 3000, gen))
    a, b = make_pair(int(offsets[-1]), torch.float32, device, gen)
    r1 = pareto_lora.integrate(a, b, offsets, rule="mmpareto", backend=name)
    r2 = pareto_lora.integrate(a, b, offsets, rule="mmpareto", backend=name)
    for x, y in [(r1.out, r2.out), (r1.stats, r2.stats), (r1.coeffs, r2.coeffs), (r1.cases, r2.cases)]:
        assert torch.equal(x, y)


def test_cpu_result_independent_of_thread_count():
    gen = torch.Generator().manual_seed(4)
    offsets = random_offsets(random_sizes(9, 200_000, gen))
    a, b = make_pair(int(offsets[-1]), torch.float32, "cpu", gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1 = pareto_lora.integrate(a, b, offsets, backend="cpp")
        torch.set_num_threads(max(2, before))
        r2 = pareto_lora.integrate(a, b, offsets, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(r1.stats, r2.stats) and torch.equal(r1.out, r2.out)


# ---- constructed cases ----------------------------------------------------------------------
def _constructed(kind, n=257, gen=None):
    gen = gen or torch.Generator().manual_seed(21)
    a = torch.randn(n, generator=gen, dtype=torch.float64)
    if kind == "parallel":
        return a, 3.0 * a
    if kind == "anti_parallel":
        return a, -a
    if kind == "orthogonal":
        x, y = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        x[: n // 2] = a[: n // 2]
        y[n // 2 :] = a[n // 2 :]
        return x, y
    if kind == "a_zero":
        return torch.zeros(n, dtype=torch.float64), a
    if kind == "both_zero":
        return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    if kind == "identical":
        return a, a.clone()
    if kind == "tiny":
        return 1e-15 * a, -0.5e-15 * a + 1e-16 * torch.randn(n, generator=gen, dtype=torch.float64)
    raise KeyError(kind)


EXPECTED_CASE = {  # pareto_lora rule, tau=0.5, literal r > tau
    "parallel": Case.SUMMED,  # r = 1/3 <= 0.5
    "anti_parallel": Case.PARETO,
    "orthogonal": Case.RESCALED,  # a.b = 0: no conflict; r ~ 1 > 0.5
    "a_zero": Case.DEGENERATE,
    "both_zero": Case.DEGENERATE,
    "identical": Case.RESCALED,  # r = 1 > 0.5, already equal norms: alpha = beta = 1
    "tiny": Case.PARETO,
}


@pytest.mark.parametrize("kind", list(EXPECTED_CASE))
@pytest.mark.parametrize("rule", RULES)
def test_constructed_cases(any_backend, kind, rule):
    name, device = any_backend
    a64, b64 = _constructed(kind)
    offsets = torch.tensor([0, a64.numel()])
    a, b = a64.float().to(device), b64.float().to(device)
    res = pareto_lora.integrate(a, b, offsets, rule=rule, backend=name)
    _, _, ref_coeffs, ref_cases = pareto_lora.integrate(a64, b64, offsets, rule=rule, backend="reference")
    assert torch.equal(res.cases.cpu(), ref_cases)
    torch.testing.assert_close(res.coeffs.cpu().double(), ref_coeffs, rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(res.out).all())
    if rule == "pareto_lora":
        assert int(res.cases[0]) == EXPECTED_CASE[kind]
    if kind == "anti_parallel" and rule in ("pareto_lora", "pareto_only", "mgda"):
        assert float(res.out.abs().max()) < 1e-6  # min-norm point of {a, -a} is 0
    if kind == "anti_parallel" and rule == "mmpareto":
        assert int(res.cases[0]) == Case.STATIONARY and float(res.out.abs().max()) == 0.0
    if kind in ("a_zero", "both_zero") and rule in ("mean", "upgrad", "dualproj", "aligned_mtl"):
        torch.testing.assert_close(res.out, (a + b) / 2)  # the mean, as torchjd (docs/rules.md)
    elif kind in ("a_zero", "both_zero") and rule in ("cagrad", "nash_mtl"):  # torchjd's: 0 / the unit b
        torch.testing.assert_close(res.out, b / b.norm() if rule == "nash_mtl" and kind == "a_zero" else 0 * b)
    elif kind in ("a_zero", "both_zero") and rule != "mgda":
        torch.testing.assert_close(res.out, a + b)  # nothing rescaled by a zero norm


def test_huge_values_are_correct_or_flagged(any_backend):
    """1e20 in fp32: the squares overflow float32; the segment must be right or flagged NONFINITE."""
    name, device = any_backend
    gen = torch.Generator().manual_seed(2)
    a64 = 1e20 * torch.randn(300, generator=gen, dtype=torch.float64)
    b64 = -0.3 * a64 + 1e19 * torch.randn(300, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([0, 300])
    res = pareto_lora.integrate(a64.float().to(device), b64.float().to(device), offsets, backend=name)
    _, _, ref_coeffs, ref_cases = reference.integrate(a64, b64, offsets)
    if int(res.cases[0]) == Case.NONFINITE:
        torch.testing.assert_close(res.coeffs.cpu(), torch.ones(1, 2))
        assert bool(res.nonfinite)
    else:
        assert torch.equal(res.cases.cpu(), ref_cases)
        torch.testing.assert_close(res.coeffs.cpu().double(), ref_coeffs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_is_reported_and_reaches_output(any_backend, bad):
    name, device = any_backend
    gen = torch.Generator().manual_seed(8)
    offsets = torch.tensor([0, 100, 250, 400])
    a, b = make_pair(400, torch.float32, device, gen)
    a[120] = bad
    res = pareto_lora.integrate(a, b, offsets, rule="pareto_lora", backend=name)
    cases = res.cases.cpu()
    assert int(cases[1]) == Case.NONFINITE
    assert int(cases[0]) != Case.NONFINITE and int(cases[2]) != Case.NONFINITE
    assert bool(res.nonfinite)
    assert not bool(torch.isfinite(res.out[100:250]).all())  # the sum carries the NaN/Inf on
    assert bool(torch.isfinite(res.out[:100]).all()) and bool(torch.isfinite(res.out[250:]).all())


def test_inactive_segments_get_plain_sum(any_backend):
    name, device = any_backend
    gen = torch.Generator().manual_seed(12)
    offsets = torch.tensor([0, 64, 128, 192])
    a, b = make_pair(192, torch.float32, device, gen, corr=-0.9)
    active = torch.tensor([False, True, False], device=device)
    res = pareto_lora.integrate(a, b, offsets, rule="mgda", active=active, backend=name)
    assert res.cases.cpu().tolist()[0] == Case.INACTIVE and res.cases.cpu().tolist()[2] == Case.INACTIVE
    torch.testing.assert_close(res.out[:64], a[:64] + b[:64])
    torch.testing.assert_close(res.out[128:], a[128:] + b[128:])


def test_symmetric_imbalance_test():
    """Literal r > tau vs symmetric max(r, 1/r) > 1/tau on a text-weak segment (r = 0.4)."""
    stats = torch.tensor([[0.16, 1.0, 0.1]])  # ||a|| = 0.4, ||b|| = 1, cos > 0
    _, lit = pareto_lora.rule_coefficients(stats, "pareto_lora", 0.5)
    coeffs, sym = pareto_lora.rule_coefficients(stats, "pareto_lora", 0.5, symmetric=True)
    assert int(lit[0]) == Case.SUMMED  # 0.4 > 0.5 is false
    assert int(sym[0]) == Case.RESCALED  # 1/0.4 = 2.5 > 2
    torch.testing.assert_close(coeffs, torch.tensor([[2.5, 1.0]]))


def test_result_diagnostics():
    stats = torch.tensor([[4.0, 1.0, -1.0], [0.0, 1.0, 0.0]])
    res = pareto_lora.IntegrationResult(out=torch.zeros(0), stats=stats, coeffs=torch.ones(2, 2), cases=torch.zeros(2))
    torch.testing.assert_close(res.norm_a, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(res.cosine, torch.tensor([-0.5, 0.0]))
    torch.testing.assert_close(res.ratio, torch.tensor([2.0, 0.0]))


def test_float64_reference_dtype():
    a, b = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    out, stats, coeffs, cases = reference.integrate(a, b, torch.tensor([0, 10]))
    assert stats.dtype == coeffs.dtype == out.dtype == torch.float64 and cases.dtype == torch.int32

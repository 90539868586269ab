"""Issue 11's classes of bad input and numerically hard input, on every backend present.

Each misuse gets a ValueError naming the argument before anything is written; each hard input
gets the right answer or a documented case (NONFINITE, STATIONARY), identical on every backend.
"""

import pytest
import torch

import pareto_lora
from pareto_lora import Case, reference
from pareto_lora.rules import MAX_COEFFICIENT, STATIONARY_REL


def _pair(n=64, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).to(dtype).to(device), torch.randn(n, generator=gen).to(dtype).to(device)


# ---- 1. out partially overlapping a or b -----------------------------------------------------------
@pytest.mark.parametrize("which", ["a", "b"])
def test_partial_overlap_of_out_is_refused(any_backend, which):
    name, device = any_backend
    buf = torch.randn(101, device=device)
    other = torch.randn(100, device=device)
    a, b = (buf[:-1], other) if which == "a" else (other, buf[:-1])
    out = buf[1:]
    before = buf.clone()
    with pytest.raises(ValueError, match=rf"^out: expected a, b or memory disjoint from both; it partially overlaps {which}"):
        pareto_lora.integrate(a, b, torch.tensor([0, 100]), out=out, backend=name)
    assert torch.equal(buf, before)


@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("op", ["integrate", "combine"])
def test_partial_overlap_through_another_storage_object_is_refused(any_backend, which, op):
    """Two torch.from_numpy views of one NumPy buffer are two storage objects over the same memory:
    overlap is decided on addresses (issue 27; the compiled op accepted it and returned wrong values)."""
    np = pytest.importorskip("numpy")
    name, device = any_backend
    if device != "cpu":
        pytest.skip("from_numpy views live on the host")
    buf = np.random.default_rng(0).standard_normal(101).astype(np.float32)
    x, out = torch.from_numpy(buf[:-1]), torch.from_numpy(buf[1:])
    assert x.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()  # two storages, shared memory
    other = torch.randn(100)
    a, b = (x, other) if which == "a" else (other, x)
    before = buf.copy()
    with pytest.raises(ValueError, match=rf"^out: expected a, b or memory disjoint from both; it partially overlaps {which}"):
        if op == "integrate":
            pareto_lora.integrate(a, b, torch.tensor([0, 100]), out=out, backend=name)
        else:
            pareto_lora.combine(a, b, torch.tensor([0, 100]), torch.ones(1, 2), out=out, backend=name)
    assert (buf == before).all()
    # the same memory exactly, through another storage object, is in place: allowed
    same = torch.from_numpy(buf[:-1])
    want = pareto_lora.integrate(x.clone(), other, torch.tensor([0, 100]), backend="reference").out
    pareto_lora.integrate(x, other, torch.tensor([0, 100]), out=same, backend=name)
    torch.testing.assert_close(same, want)


@pytest.mark.parametrize("op", ["integrate", "combine"])
def test_out_that_requires_grad_is_refused_on_every_backend(any_backend, op):
    """Issue 27: the reference raised a RuntimeError, the compiled and Triton ops wrote into the leaf."""
    name, device = any_backend
    a, b = _pair(device=device)
    out = torch.zeros(64, device=device, requires_grad=True)
    with pytest.raises(ValueError, match=r"^out: expected a tensor that does not require grad"):
        if op == "integrate":
            pareto_lora.integrate(a, b, torch.tensor([0, 64]), out=out, backend=name)
        else:
            pareto_lora.combine(a, b, torch.tensor([0, 64]), torch.ones(1, 2, device=device), out=out, backend=name)
    assert not bool(out.detach().any())


def test_exact_aliasing_and_disjoint_views_still_work(any_backend):
    name, device = any_backend
    buf = torch.randn(200, device=device)
    a, b = buf[:100], buf[100:]  # same storage, disjoint
    want = pareto_lora.integrate(a.clone(), b.clone(), torch.tensor([0, 100]), backend="reference").out
    out = torch.empty(100, device=device)
    got = pareto_lora.integrate(a, b, torch.tensor([0, 100]), out=out, backend=name).out
    torch.testing.assert_close(got.cpu(), want.cpu().to(got.dtype))
    res = pareto_lora.integrate(a, b, torch.tensor([0, 100]), out=b, backend=name)  # in place
    torch.testing.assert_close(res.out.cpu(), want.cpu().to(got.dtype))


# ---- 2. tensors on another device (meta included) -----------------------------------------------
@pytest.mark.parametrize("arg", ["b", "offsets", "active", "out"])
def test_meta_tensors_are_refused_naming_the_argument(any_backend, arg):
    name, device = any_backend
    a, b = _pair(device=device)
    # out holds a sentinel, not empty_like garbage: NaN bits there made torch.equal fail at random
    kw = dict(a=a, b=b, offsets=torch.tensor([0, 30, 64]), out=torch.full_like(a, 7.0), active=torch.tensor([True, False]))
    kw[arg] = kw[arg].to("meta")
    snapshot = {k: v.clone() for k, v in kw.items() if v.device.type != "meta"}
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        pareto_lora.integrate(kw["a"], kw["b"], kw["offsets"], out=kw["out"], active=kw["active"], backend=name)
    for k, v in snapshot.items():
        assert torch.equal(kw[k], v), k


def test_meta_coeffs_and_stats_are_refused(any_backend):
    name, device = any_backend
    a, b = _pair(device=device)
    with pytest.raises(ValueError, match=r"^coeffs: "):
        pareto_lora.combine(a, b, torch.tensor([0, 64]), torch.ones(1, 2, device="meta"), backend=name)
    stats = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"^active: "):
        pareto_lora.rule_coefficients(stats, active=torch.tensor([True], device="meta"), backend=name)


# ---- 3. strided active ------------------------------------------------------------------------------
def test_strided_active_is_read_with_its_stride(any_backend):
    name, device = any_backend
    a, b = _pair(n=90, device=device)
    offsets = torch.tensor([0, 30, 60, 90])
    mask = torch.tensor([False, True, True, False, False, True], device=device)[::2]  # F, T, F
    assert not mask.is_contiguous()
    res = pareto_lora.integrate(a, b, offsets, rule="mgda", active=mask, backend=name)
    want = pareto_lora.integrate(a, b, offsets, rule="mgda", active=mask.contiguous(), backend=name)
    assert res.cases.tolist() == want.cases.tolist()
    assert res.cases[0] == Case.INACTIVE and res.cases[2] == Case.INACTIVE and res.cases[1] != Case.INACTIVE


# ---- 4. mmpareto near a Pareto-stationary pair --------------------------------------------------------
def _mmpareto_pair(eps, n=4096, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(n, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, generator=gen, dtype=torch.float64)
    b = -0.5 * a + eps * noise * a.norm() / noise.norm()
    return a.to(dtype).to(device), b.to(dtype).to(device)


@pytest.mark.parametrize("eps", [0.0, 1e-9, 1e-6, 1e-4, 1e-2, 0.3])
def test_mmpareto_never_amplifies_noise(any_backend, eps):
    name, device = any_backend
    a, b = _mmpareto_pair(eps, device=device)
    res = pareto_lora.integrate(a, b, torch.tensor([0, a.numel()]), rule="mmpareto", gamma=1.0, backend=name)
    a64, b64 = a.double().cpu(), b.double().cpu()
    bound = (a64 + b64).norm()
    assert float(res.out.double().cpu().norm()) <= 1.031 * float(bound) + 1e-6 * float(a64.norm() + b64.norm())
    ref = pareto_lora.integrate(a64, b64, torch.tensor([0, a.numel()]), rule="mmpareto", backend="reference")
    assert res.cases.tolist() == ref.cases.tolist()
    if eps <= 1e-6:
        assert int(res.cases[0]) == Case.STATIONARY  # below the documented threshold
    if eps >= 1e-2:
        assert int(res.cases[0]) == Case.PARETO


def test_stationary_threshold_is_relative_and_the_same_everywhere(any_backend):
    name, device = any_backend
    # h = 2 lam a + 2 (1 - lam) b for anti-parallel-ish stats: built from statistics directly.
    na, nb = 3.0, 1.5
    for rel in (STATIONARY_REL * 0.5, STATIONARY_REL * 4):
        # a.b chosen so that ||h||^2 / (h_a ||a|| + h_b ||b||)^2 is about `rel`
        lo, hi = -na * nb, 0.0
        for _ in range(200):  # bisection on a.b
            ab = (lo + hi) / 2
            aa, bb = na * na, nb * nb
            lam = min(max((bb - ab) / (aa + bb - 2 * ab), 0.0), 1.0)
            ha, hb = 2 * lam, 2 * (1 - lam)
            r = (ha * ha * aa + hb * hb * bb + 2 * ha * hb * ab) / (ha * na + hb * nb) ** 2
            lo, hi = (ab, hi) if r < rel else (lo, ab)
        stats = torch.tensor([[na * na, nb * nb, ab]], dtype=torch.float64, device=device)
        _, cases = pareto_lora.rule_coefficients(stats, "mmpareto", backend=name)
        want = Case.STATIONARY if rel < STATIONARY_REL else Case.PARETO
        assert int(cases[0]) == want, rel


# ---- 5. statistics over the whole float32 range ----------------------------------------------------------
@pytest.mark.parametrize("scale_b", [1e-23, 1e-30, 1e18])
def test_tiny_and_huge_gradients_keep_their_norms(any_backend, scale_b):
    name, device = any_backend
    a, b = _pair(n=1000, device=device, seed=3)
    b = b * scale_b
    res = pareto_lora.integrate(a, b, torch.tensor([0, 1000]), rule="rescale_only", symmetric=True, backend=name)
    a64, b64 = a.double().cpu(), b.double().cpu()
    torch.testing.assert_close(res.stats.cpu()[0, 1], b64.dot(b64), rtol=1e-12, atol=0)
    assert int(res.cases[0]) == Case.RESCALED
    # the weaker is rescaled to the stronger's norm: ||alpha a|| == ||beta b||
    alpha, beta = res.coeffs[0].double().tolist()
    assert abs(alpha * a64.norm().item() - beta * b64.norm().item()) <= 1e-6 * alpha * a64.norm().item()
    out = res.out.double().cpu()
    assert bool(torch.isfinite(out).all())
    assert float(out.norm()) <= 2.0 * float(max(a64.norm(), b64.norm())) * 1.000001


def test_a_coefficient_beyond_float32_is_not_written(any_backend):
    name, device = any_backend
    stats = torch.tensor([[1e30, 1e-60, 0.0], [4.0, 1.0, 0.0]], dtype=torch.float64, device=device)
    coeffs, cases = pareto_lora.rule_coefficients(stats, "rescale_only", backend=name)
    assert cases.tolist() == [Case.NONFINITE, Case.RESCALED]
    assert coeffs[0].tolist() == [1.0, 1.0] and bool(torch.isfinite(coeffs).all())
    assert float(coeffs[1, 1]) <= MAX_COEFFICIENT


# Issue 27: a combine whose float32 products would overflow, where the float64 reference's would not.
_OVERFLOW_CASES = [
    # rescale_only: b (norm 1e10) rescaled by 4.2e28 to a's norm 4.2e38; b's first product overflows
    # float32 while a + beta * b is -3e38 + 4.2e38 = 1.2e38 in float64
    (dict(rule="rescale_only"), [-3e38, 3e38], [1e10, 0.0]),
    # mmpareto with gamma = 3e38: coefficients ~3e38 below float32's maximum, products beyond it
    (dict(rule="mmpareto", gamma=3e38), [1.0, 1.0], [1.0, -1.1]),
    (dict(rule="mmpareto", gamma=3e38), [1.0, 2.0], [3.0, 1.0]),
    (dict(rule="pareto_lora"), [-3e38, 3e38], [-1e10, 0.0]),
]


@pytest.mark.parametrize("kwargs, xa, xb", _OVERFLOW_CASES)
def test_a_combine_that_would_overflow_float32_is_nonfinite_on_every_backend(any_backend, kwargs, xa, xb):
    name, device = any_backend
    a, b = torch.tensor(xa, device=device), torch.tensor(xb, device=device)
    res = pareto_lora.integrate(a, b, torch.tensor([0, 2]), backend=name, **kwargs)
    ref = pareto_lora.integrate(a.cpu(), b.cpu(), torch.tensor([0, 2]), **kwargs, backend="reference")
    assert int(res.cases[0]) == int(ref.cases[0]) == Case.NONFINITE
    assert res.coeffs.cpu().tolist() == [[1.0, 1.0]]
    assert torch.equal(res.out.cpu(), a.cpu() + b.cpu())  # the plain sum, exact here
    assert bool(torch.isfinite(res.out).all())


def test_the_term_bound_keeps_every_backend_finite_where_the_oracle_is(any_backend):
    """Random statistics around the bound: cases agree with the oracle, and wherever a rule's
    coefficients are kept, |c| * ||x|| stays at or below MAX_TERM (so no float32 product overflows)."""
    name, device = any_backend
    gen = torch.Generator().manual_seed(7)
    na = 10 ** (torch.rand(400, generator=gen, dtype=torch.float64) * 76 - 38)
    nb = 10 ** (torch.rand(400, generator=gen, dtype=torch.float64) * 76 - 38)
    cos = torch.rand(400, generator=gen, dtype=torch.float64) * 2 - 1
    stats = torch.stack([na * na, nb * nb, cos * na * nb], dim=1)
    for rule in pareto_lora.RULES:
        for gamma in (1.0, 1e30):
            coeffs, cases = pareto_lora.rule_coefficients(stats.to(device), rule, gamma=gamma, backend=name)
            ref_c, ref_k = pareto_lora.rule_coefficients(stats, rule, gamma=gamma, backend="reference")
            assert cases.cpu().tolist() == ref_k.tolist(), (rule, gamma)
            c = coeffs.cpu().double().abs()
            kept = cases.cpu() != Case.NONFINITE
            for col, norm in ((0, na), (1, nb)):
                big = kept & (c[:, col] > 1)
                assert bool((c[big, col] * norm[big] <= MAX_COEFFICIENT).all()), (rule, gamma)


def test_rule_constants_are_the_same_in_cpp_and_python():
    """csrc/rule.h restates rules.py's constants (C++ cannot import them): the values must agree."""
    import pathlib
    import re

    from pareto_lora import rules

    text = (pathlib.Path(__file__).parents[1] / "csrc" / "rule.h").read_text()
    consts = dict(re.findall(r"constexpr double (k\w+) = ([^;]+);", text))
    env = {"kStatsRelErr": rules.STATS_REL_ERR}
    for cname, pname in (("kCauchySchwarzSlack", "CAUCHY_SCHWARZ_SLACK"), ("kStationaryRel", "STATIONARY_REL"),
                         ("kMaxCoefficient", "MAX_COEFFICIENT"), ("kMaxTerm", "MAX_TERM")):
        value = eval(consts[cname], {}, dict(env, kMaxCoefficient=rules.MAX_COEFFICIENT))  # noqa: S307 (our header)
        assert value == getattr(rules, pname), cname
    assert float.fromhex(consts["kStatsRelErr"]) == rules.STATS_REL_ERR


# ---- 6. statistics that cannot be ------------------------------------------------------------------------
def test_invalid_statistics_are_nonfinite_everywhere(any_backend):
    name, device = any_backend
    stats = torch.tensor(
        [
            [-1.0, 1.0, 0.0],  # negative squared norm
            [1.0, -1e-3, 0.0],
            [1.0, 4.0, 2.5],  # a.b > ||a|| ||b|| = 2: not rounding
            [1.0, 4.0, -2.0 * (1 + 1e-9)],  # within rounding: clamped to -||a|| ||b||
            [1.0, 4.0, 1.0],  # valid
        ],
        dtype=torch.float64,
        device=device,
    )
    for rule in pareto_lora.RULES:
        coeffs, cases = pareto_lora.rule_coefficients(stats, rule, backend=name)
        ref_c, ref_k = pareto_lora.rule_coefficients(stats.cpu(), rule, backend="reference")
        assert cases.tolist()[:3] == [Case.NONFINITE] * 3, rule
        assert cases.cpu().tolist() == ref_k.tolist(), rule
        torch.testing.assert_close(coeffs.cpu(), ref_c, rtol=1e-6, atol=0)


# ---- 7. argument types ----------------------------------------------------------------------------------
def test_lists_for_offsets_and_active_are_accepted(any_backend):
    name, device = any_backend
    a, b = _pair(device=device)
    res = pareto_lora.integrate(a, b, [0, 30, 64], active=[True, False], backend=name)
    want = pareto_lora.integrate(a, b, torch.tensor([0, 30, 64]), active=torch.tensor([True, False], device=device), backend=name)
    assert res.cases.tolist() == want.cases.tolist()
    torch.testing.assert_close(res.out, want.out)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(offsets=[0, 30.0, 64]), "offsets"),
        (dict(offsets="0,64"), "offsets"),
        (dict(active=[1, 0]), "active"),
        (dict(active="yes"), "active"),
        (dict(tau=10**400), "tau"),
        (dict(tau="0.5"), "tau"),
        (dict(gamma=float("nan")), "gamma"),
        (dict(rule=5), "rule"),
    ],
)
def test_wrong_argument_types_name_the_argument(any_backend, kwargs, arg):
    name, device = any_backend
    a, b = _pair(device=device)
    kw = dict(offsets=torch.tensor([0, 30, 64]), active=None) | kwargs
    offsets = kw.pop("offsets")
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        pareto_lora.integrate(a, b, offsets, backend=name, **kw)


def test_tau_none_means_the_default(any_backend):
    name, device = any_backend
    a, b = _pair(device=device)
    x = pareto_lora.integrate(a, b, [0, 64], tau=None, backend=name)
    y = pareto_lora.integrate(a, b, [0, 64], tau=0.5, backend=name)
    assert torch.equal(x.out, y.out)


def test_offsets_whose_differences_overflow_are_refused(any_backend):
    name, device = any_backend
    a, b = _pair(n=100, device=device)
    offsets = torch.tensor([0, 2**63 - 1, -(2**63) + 5, 100])
    with pytest.raises(ValueError, match=r"^offsets: expected non-decreasing"):
        pareto_lora.integrate(a, b, offsets, backend=name)


def test_dtypes_are_named_alike_on_every_backend(any_backend):
    name, device = any_backend
    a, b = _pair(device=device)
    with pytest.raises(ValueError, match=r"^offsets: expected dtype int64, got int32$"):
        pareto_lora.integrate(a, b, torch.tensor([0, 64], dtype=torch.int32), backend=name)
    with pytest.raises(ValueError, match=r"^b: expected dtype float32 \(same as a\), got float64$"):
        pareto_lora.integrate(a, b.double(), torch.tensor([0, 64]), backend=name)
    with pytest.raises(ValueError, match=r"^active: expected dtype bool, got int64$"):
        pareto_lora.integrate(a, b, torch.tensor([0, 64]), active=torch.tensor([1], device=device), backend=name)


# ---- 10. bf16 results rounded to nearest ------------------------------------------------------------------
def test_bf16_output_is_rounded_to_nearest_like_torch(any_backend):
    name, device = any_backend
    a, b = _pair(n=20000, device=device, dtype=torch.bfloat16, seed=5)
    coeffs = torch.tensor([[0.37, 1.91]], device=device)
    out = pareto_lora.combine(a, b, torch.tensor([0, 20000]), coeffs, backend=name)
    want = (0.37 * a.float() + 1.91 * b.float()).to(torch.bfloat16)  # torch: float32 math, nearest-even
    mismatch = (out.float() != want.float()).float().mean().item()
    assert mismatch < 0.01, mismatch  # fused multiply-add may differ from torch's two roundings rarely


def test_mmpareto_on_float32_statistics_near_stationarity_keeps_its_bound(any_backend):
    """Statistics summed elsewhere in float32 (2^-24 errors): near a Pareto-stationary pair the
    computed ||h|| is mostly rounding, and dividing by it used to scale outputs up to ~500x."""
    name, device = any_backend
    worst = 0.0
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        for wiggle in (1e-5, 1e-4, 3e-4, 1e-3):
            x = torch.randn(300, generator=gen, dtype=torch.float64)
            y = torch.randn(300, generator=gen, dtype=torch.float64)
            a, b = x.float().double(), (-(x + wiggle * y) * 0.5).float().double()
            stats32 = reference.segment_stats(a, b, torch.tensor([0, 300])).float()
            coeffs, _ = pareto_lora.rule_coefficients(stats32.to(device), "mmpareto", backend=name)
            alpha, beta = coeffs[0].double().tolist()
            worst = max(worst, float((alpha * a + beta * b).norm() / (a + b).norm()))
    assert worst <= 1.031, worst

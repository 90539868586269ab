"""CUDA backend of the integration ops (csrc/cuda/), checked against pareto_lora.reference.

The GPU tests skip without a CUDA device. With a device they also fail (not skip) when the
extension was built without its CUDA kernels, so a CPU-only build cannot pass for a GPU one.
The host logic of the kernel's work layout is tested everywhere, in test_cuda_schedule.py.
"""

from __future__ import annotations


import pytest
import torch

import pareto_lora
from pareto_lora import Case
from pareto_lora import reference as ref
from _cuda_inputs import make_pair, offsets_from_sizes, random_sizes

RULES = ("sum", "pareto_lora", "pareto_only", "rescale_only", "mgda", "mmpareto", "mean", "constant", "upgrad",
         "pcgrad", "dualproj", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl", "config")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PATHS = ("fused", "two_pass")
# Launch plans x one-pass tiles (segments of one tile done by one block) on or off.
PLANS = {"fused": ("fused", "1"), "two_pass": ("two_pass", "1"), "fused-no-one-pass": ("fused", "0"),
         "two_pass-no-one-pass": ("two_pass", "0")}

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- helpers ----------------------------------------------------------------------------------------
def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def assert_stats_close(stats, expected, dtype):
    """Relative to ||a||^2, ||b||^2 and, for a.b (which may cancel), to ||a|| ||b||."""
    s = stats.double().cpu()
    e = expected.double().cpu()
    # Stats are exact products summed in float64: the reference (float64 too) agrees to ~n 2^-53.
    tol = 1e-11
    scale = torch.stack([e[:, 0], e[:, 1], (e[:, 0] * e[:, 1]).sqrt()], 1)
    bad = (s - e).abs() > tol * scale + 1e-30
    assert not bool(bad.any()), f"stats differ in segments {torch.nonzero(bad.any(1)).flatten()[:10].tolist()}"


def assert_combined(out, a, b, offsets, coeffs):
    """out == alpha*a + beta*b to a few units of rounding of the output dtype."""
    expected = ref.combine(a, b, offsets, coeffs.to(a.device)).double()
    seg = ref.segment_ids(offsets, a.device)
    c = coeffs.double()
    mag = (c[seg, 0] * a.double()).abs() + (c[seg, 1] * b.double()).abs()
    err = (out.double() - expected).abs()
    bad = err > 4 * eps(a.dtype) * mag + torch.finfo(a.dtype).tiny
    assert not bool(bad.any()), f"out differs at {torch.nonzero(bad).flatten()[:10].tolist()}"


def check_against_reference(res, a, b, offsets, rule, tau=0.5, active=None, gamma=1.0, symmetric=False):
    ref_stats = ref.segment_stats(a, b, offsets)
    assert res.stats.dtype == torch.float64 and res.stats.shape == ref_stats.shape
    assert_stats_close(res.stats, ref_stats, a.dtype)
    # The rule applied by the reference to the kernel's own statistics: same decisions, same values.
    want_coeffs, want_cases = pareto_lora.rule_coefficients(res.stats, rule, tau, active, gamma, symmetric, backend="reference")
    torch.testing.assert_close(res.cases, want_cases.to(torch.int32), rtol=0, atol=0)
    torch.testing.assert_close(res.coeffs, want_coeffs.float(), rtol=1e-6, atol=1e-7)
    assert_combined(res.out, a, b, offsets, res.coeffs)


@pytest.fixture(params=["fused", "two_pass", "fused-no-one-pass"])
def path(request, monkeypatch):
    plan, one_pass = PLANS[request.param]
    monkeypatch.setenv("PARETO_LORA_CUDA_PATH", plan)
    monkeypatch.setenv("PARETO_LORA_CUDA_ONE_PASS", one_pass)
    return request.param


def integrate(*args, **kw):
    return pareto_lora.integrate(*args, backend="cpp", **kw)


# ---- GPU tests --------------------------------------------------------------------------------------
@gpu
def test_cuda_kernels_registered():
    for op in ("segment_stats", "rule_coefficients", "combine", "integrate"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pareto_lora::{op}", "CUDA"), op
    assert "cpp" in pareto_lora.available_backends("cuda")


@gpu
def test_many_random_segments(path):
    offsets = offsets_from_sizes(random_sizes(1500, 150_000, seed=1))
    a, b = make_pair(offsets, torch.float32, seed=1)
    res = integrate(a, b, offsets, rule="pareto_lora")
    check_against_reference(res, a, b, offsets, "pareto_lora")
    counts = torch.bincount(res.cases.cpu().long(), minlength=7)
    for case in (Case.SUMMED, Case.RESCALED, Case.PARETO, Case.DEGENERATE):
        assert counts[int(case)] > 0, f"test data never hit case {case!r}"


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_rules_and_dtypes(rule, dtype, path):
    offsets = offsets_from_sizes(random_sizes(300, 40_000, seed=2))
    a, b = make_pair(offsets, dtype, seed=2)
    res = integrate(a, b, offsets, rule=rule, tau=0.7, gamma=1.3)
    check_against_reference(res, a, b, offsets, rule, tau=0.7, gamma=1.3)


@gpu
@pytest.mark.parametrize("symmetric", [False, True])
def test_end_to_end_cases_match_reference(symmetric):
    """Cases from the reference's own float64 statistics agree away from decision boundaries."""
    offsets = offsets_from_sizes(random_sizes(1200, 20_000, seed=3))
    a, b = make_pair(offsets, torch.float32, seed=3)
    res = integrate(a, b, offsets, rule="pareto_lora", tau=0.5, symmetric=symmetric)
    _, ref_stats, _, ref_cases = pareto_lora.integrate(a, b, offsets, None, "pareto_lora", 0.5, None, 1.0, symmetric, backend="reference")
    s = ref_stats.double()
    cos = s[:, 2] / (s[:, 0] * s[:, 1]).sqrt().clamp_min(1e-300)
    ratio = (s[:, 0] / s[:, 1]).sqrt()
    clear = (cos.abs() > 1e-3) & ((ratio / 0.5 - 1).abs() > 1e-3) & ((ratio * 0.5 - 1).abs() > 1e-3)
    assert torch.equal(res.cases[clear], ref_cases.to(torch.int32)[clear])


@gpu
def test_single_segment_of_2_pow_27(path):
    n = 1 << 27
    gen = torch.Generator(device="cuda").manual_seed(4)
    a = torch.randn(n, device="cuda", generator=gen)
    b = -0.3 * a + torch.randn(n, device="cuda", generator=gen)
    offsets = torch.tensor([0, n])
    res = integrate(a, b, offsets, rule="pareto_lora")
    a64, b64 = a.double(), b.double()
    want = torch.stack([a64.dot(a64), b64.dot(b64), a64.dot(b64)]).reshape(1, 3)
    del a64, b64
    assert_stats_close(res.stats, want, torch.float32)
    assert int(res.cases[0]) == int(Case.PARETO)
    alpha, beta = res.coeffs[0].tolist()
    expected = alpha * a.double() + beta * b.double()
    err = (res.out.double() - expected).abs().max().item()
    assert err <= 4 * eps(torch.float32) * (abs(alpha) * a.abs().max().item() + abs(beta) * b.abs().max().item())


@gpu
@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """int64 indexing: bf16 buffers of 2^31 + 1000 elements, the middle segment crossing 2^31."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~15 GiB of free device memory and headroom")
    n = (1 << 31) + 1000
    offsets = torch.tensor([0, 12345, n - 7, n])
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    # A cheap deterministic pattern with per-element variation, in chunks (no 2^31 temporaries).
    chunk = 1 << 28
    for i in range(0, n, chunk):
        idx = torch.arange(i, min(n, i + chunk), device="cuda", dtype=torch.int64)
        a[i : i + idx.numel()] = ((idx % 1013).float() / 1013 - 0.5).to(torch.bfloat16)
        b[i : i + idx.numel()] = ((idx % 997).float() / 997 - 0.25).to(torch.bfloat16)
    res = integrate(a, b, offsets, rule="pareto_lora")
    want = torch.zeros(3, 3, dtype=torch.float64)
    for s in range(3):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        for i in range(lo, hi, chunk):
            x, y = a[i : min(hi, i + chunk)].double(), b[i : min(hi, i + chunk)].double()
            want[s] += torch.stack([x.dot(x), y.dot(y), x.dot(y)]).cpu()
    assert_stats_close(res.stats, want, torch.bfloat16)
    c = res.coeffs.cpu()
    for s in range(3):  # spot-check out near the segment ends, including around 2^31
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        for i in (lo, hi - 5, (1 << 31) - 2):
            if not lo <= i < hi:
                continue
            j = slice(i, min(hi, i + 4))
            exp = c[s, 0].double() * a[j].double().cpu() + c[s, 1].double() * b[j].double().cpu()
            torch.testing.assert_close(res.out[j].cpu().double(), exp, rtol=2 * eps(torch.bfloat16), atol=1e-6)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype):
    offsets = offsets_from_sizes(random_sizes(1000, 300_000, seed=5))
    a, b = make_pair(offsets, dtype, seed=5)
    first = integrate(a, b, offsets, rule="mmpareto")
    for _ in range(3):
        again = integrate(a, b, offsets, rule="mmpareto")
        for name in ("stats", "coeffs", "cases", "out"):
            assert torch.equal(getattr(first, name), getattr(again, name)), name


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_plan_agrees_bitwise(monkeypatch, dtype):
    """Fused or two launches, one-pass tiles on or off: the same bits (many segments of one tile)."""
    offsets = offsets_from_sizes(random_sizes(700, 200_000, seed=6))
    a, b = make_pair(offsets, dtype, seed=6)
    results = {}
    for name, (plan, one_pass) in PLANS.items():
        monkeypatch.setenv("PARETO_LORA_CUDA_PATH", plan)
        monkeypatch.setenv("PARETO_LORA_CUDA_ONE_PASS", one_pass)
        results[name] = integrate(a, b, offsets, rule="pareto_lora")
    for plan, res in results.items():
        for field in ("stats", "coeffs", "cases", "out"):
            assert torch.equal(getattr(res, field), getattr(results["fused"], field)), (plan, field)
    # segment_stats runs the same reduce tiles.
    assert torch.equal(pareto_lora.segment_stats(a, b, offsets, backend="cpp"), results["fused"].stats)
    check_against_reference(results["two_pass"], a, b, offsets, "pareto_lora")


@gpu
def test_one_pass_flag_is_checked_before_any_write(monkeypatch):
    offsets = offsets_from_sizes([3, 5])
    a, b = make_pair(offsets, torch.float32, seed=1)
    out = torch.full_like(a, 7.0)
    monkeypatch.setenv("PARETO_LORA_CUDA_ONE_PASS", "yes")
    with pytest.raises(ValueError, match="PARETO_LORA_CUDA_ONE_PASS: expected '0' or '1'"):
        integrate(a, b, offsets, out=out, rule="pareto_lora")
    assert bool((out == 7.0).all())


@gpu
@pytest.mark.parametrize("target", ["a", "b"])
def test_in_place(target, path):
    offsets = offsets_from_sizes(random_sizes(400, 50_000, seed=7))
    a, b = make_pair(offsets, torch.float32, seed=7)
    expected = integrate(a, b, offsets, rule="pareto_lora")
    a2, b2 = a.clone(), b.clone()
    out = a2 if target == "a" else b2
    res = integrate(a2, b2, offsets, out=out, rule="pareto_lora")
    assert res.out.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected.out)
    assert torch.equal(res.stats, expected.stats)


@gpu
def test_misaligned_views_use_the_scalar_path_correctly(path):
    offsets = offsets_from_sizes(random_sizes(200, 30_000, seed=8))
    n = int(offsets[-1])
    a0, b0 = make_pair(offsets_from_sizes([n + 3]), torch.float32, seed=8)
    for sa, sb, so in [(1, 1, 1), (0, 1, 0), (1, 0, 2), (3, 3, 0)]:
        a, b = a0[sa : sa + n], b0[sb : sb + n]
        out = torch.empty(n + 3, device="cuda")[so : so + n]
        res = integrate(a, b, offsets, out=out, rule="pareto_only")
        check_against_reference(res, a, b, offsets, "pareto_only")


@gpu
def test_offsets_and_active_on_either_device(path):
    offsets = offsets_from_sizes(random_sizes(500, 20_000, seed=9))
    a, b = make_pair(offsets, torch.float32, seed=9)
    g = offsets.numel() - 1
    active = torch.rand(g, generator=torch.Generator().manual_seed(9)) > 0.3
    base = integrate(a, b, offsets, rule="pareto_lora", active=active)
    check_against_reference(base, a, b, offsets, "pareto_lora", active=active)
    assert bool((base.cases.cpu()[~active] == int(Case.INACTIVE)).all())
    for off, act in [(offsets.cuda(), active), (offsets, active.cuda()), (offsets.cuda(), active.cuda())]:
        res = integrate(a, b, off, rule="pareto_lora", active=act)
        for name in ("stats", "coeffs", "cases", "out"):
            assert torch.equal(getattr(res, name), getattr(base, name)), name


@gpu
def test_empty_segments_and_empty_buffers(path):
    a = torch.empty(0, device="cuda")
    res = integrate(a, a.clone(), torch.tensor([0]))
    assert res.stats.shape == (0, 3) and res.coeffs.shape == (0, 2) and res.cases.shape == (0,)
    res = integrate(a, a.clone(), torch.tensor([0, 0, 0, 0]), rule="mgda")
    assert torch.equal(res.stats.cpu(), torch.zeros(3, 3))
    assert bool((res.cases.cpu() == int(Case.DEGENERATE)).all())
    offsets = torch.tensor([0, 0, 5, 5, 6, 6])
    a, b = make_pair(offsets, torch.float32, seed=10)
    res = integrate(a, b, offsets)
    check_against_reference(res, a, b, offsets, "pareto_lora")


@gpu
def test_repeated_launches_with_changing_shapes_and_streams():
    """The workspace counters reset themselves: many launches, growing G, a second stream."""
    side = torch.cuda.Stream()
    for i, g in enumerate([3, 2000, 1, 5000, 40, 2000]):
        offsets = offsets_from_sizes(random_sizes(g, 5000, seed=20 + i))
        a, b = make_pair(offsets, torch.float32, seed=20 + i)
        stream = side if i % 2 else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())  # a, b were made on the current stream
        with torch.cuda.stream(stream):
            res = integrate(a, b, offsets, rule="pareto_lora")
        stream.synchronize()
        check_against_reference(res, a, b, offsets, "pareto_lora")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_separate_ops_match_reference(dtype):
    offsets = offsets_from_sizes(random_sizes(300, 30_000, seed=11))
    a, b = make_pair(offsets, dtype, seed=11)
    stats = pareto_lora.segment_stats(a, b, offsets, backend="cpp")
    assert_stats_close(stats, ref.segment_stats(a, b, offsets), dtype)
    active = torch.arange(300) % 7 != 0
    for st in (stats, stats.double()):
        for act in (None, active, active.cuda()):
            coeffs, cases = pareto_lora.rule_coefficients(st, "mmpareto", 0.4, act, 0.9, True, backend="cpp")
            want_c, want_k = pareto_lora.rule_coefficients(st, "mmpareto", 0.4, act, 0.9, True, backend="reference")
            assert coeffs.dtype == torch.float32 and cases.dtype == torch.int32
            torch.testing.assert_close(cases, want_k.to(torch.int32), rtol=0, atol=0)
            torch.testing.assert_close(coeffs, want_c.float(), rtol=1e-6, atol=1e-7)
    for c in (coeffs, coeffs.double()):
        out = pareto_lora.combine(a, b, offsets, c, backend="cpp")
        assert_combined(out, a, b, offsets, c)


def _bad_calls(a, b, offsets, g):
    """(description, call) pairs that must raise ValueError naming the argument before writing."""
    ok = dict(rule="pareto_lora", tau=0.5, active=None, gamma=1.0, symmetric=False)
    op = torch.ops.pareto_lora.integrate

    def call(**kw):
        args = {**ok, **kw}
        off = args.pop("offsets", offsets)
        return lambda out: op(a, b, off, out, args["rule"], args["tau"], args["active"], args["gamma"], args["symmetric"])

    decreasing = offsets.clone()
    decreasing[1], decreasing[2] = decreasing[2], decreasing[1] - 1
    yield "offsets", call(offsets=decreasing)
    yield "offsets", call(offsets=torch.tensor([0, int(offsets[-1]) - 1]))
    yield "offsets", call(offsets=torch.tensor([1, int(offsets[-1])]))
    yield "offsets", call(offsets=offsets.int())
    yield "offsets", call(offsets=offsets.cuda().flip(0))
    yield "active", call(active=torch.ones(g + 1, dtype=torch.bool))
    yield "active", call(active=torch.ones(g, dtype=torch.float32))
    yield "rule", call(rule="nope")
    yield "tau", call(tau=0.0)
    yield "gamma", call(gamma=float("nan"))


@gpu
def test_errors_before_any_write():
    offsets = offsets_from_sizes([10, 20, 30, 40])
    a, b = make_pair(offsets, torch.float32, seed=12)
    g = offsets.numel() - 1
    for name, fn in _bad_calls(a, b, offsets, g):
        for out in (torch.full_like(a, 7.0), a):
            before, a_before = out.clone(), a.clone()
            with pytest.raises(ValueError, match=f"^{name}:"):
                fn(out)
            torch.cuda.synchronize()
            assert torch.equal(out, before) and torch.equal(a, a_before), name
    out = torch.full_like(a, 7.0)
    with pytest.raises(ValueError, match="^out:"):
        torch.ops.pareto_lora.integrate(a, b, offsets, out.double(), "sum", list(pareto_lora.RuleSpec().kernel_params()))
    with pytest.raises(ValueError, match="^b:"):
        torch.ops.pareto_lora.integrate(a, b.half(), offsets, out, "sum", list(pareto_lora.RuleSpec().kernel_params()))
    with pytest.raises(ValueError, match="^coeffs:"):
        torch.ops.pareto_lora.combine(a, b, offsets, torch.ones(g + 1, 2, device="cuda"), out)
    with pytest.raises(ValueError, match="^coeffs:"):
        torch.ops.pareto_lora.combine(a, b, offsets, torch.ones(g, 2), out)
    with pytest.raises(ValueError, match="^stats:"):
        torch.ops.pareto_lora.rule_coefficients(torch.ones(g, 2, device="cuda"), "sum", list(pareto_lora.RuleSpec().kernel_params()))
    torch.cuda.synchronize()
    assert bool((out == 7.0).all())

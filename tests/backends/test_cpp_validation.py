"""Validation of the compiled ops that goes beyond shapes and dtypes (issue 11, csrc/op_args.h).

* `out` partially overlapping `a` or `b` is refused; exact aliasing (in place) is allowed.
* Every tensor argument is on the device the op runs on. The dispatcher sends meta tensors to the
  fake kernels, so the compiled kernels are reached here by redispatching to their key directly.
* A strided `active` mask is read correctly.

Every refusal is a ValueError naming the argument, raised before anything is written.
"""

import pytest
import torch

import pareto_lora
from pareto_lora import reference as ref

OPS = torch.ops.pareto_lora
PARAMS = list(pareto_lora.RuleSpec().kernel_params())  # the default rule's, as the ops take them
OFFSETS = torch.tensor([0, 30, 60, 100])
G = OFFSETS.numel() - 1
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(device="cpu", n=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).to(device), torch.randn(n, generator=gen).to(device)


def _integrate(a, b, out, offsets=OFFSETS, active=None):
    return OPS.integrate(a, b, offsets, out, "pareto_lora", PARAMS, active)


def _combine(a, b, out, offsets=OFFSETS):
    return OPS.combine(a, b, offsets, torch.ones(offsets.numel() - 1, 2, device=a.device), out)


def _raises_unchanged(match, fn, *tensors):
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match=match):
        fn()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


# ---- (a) out partially overlapping a or b ------------------------------------------------------
def _overlapping(device, victim):
    """out = buf[1:101] and `victim` = buf[0:100] of one storage; the other input is separate."""
    buf = torch.randn(101, generator=torch.Generator().manual_seed(1)).to(device)
    other = torch.randn(100, generator=torch.Generator().manual_seed(2)).to(device)
    a, b = (buf[:-1], other) if victim == "a" else (other, buf[:-1])
    return buf, a, b, buf[1:]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("victim", ["a", "b"])
@pytest.mark.parametrize("op", ["integrate", "combine", "api"])
def test_out_partially_overlapping_an_input_is_refused(device, victim, op):
    buf, a, b, out = _overlapping(device, victim)
    call = {
        "integrate": lambda: _integrate(a, b, out),
        "combine": lambda: _combine(a, b, out),
        "api": lambda: pareto_lora.integrate(a, b, OFFSETS, out=out, backend="cpp"),
    }[op]
    msg = f"^out: expected a, b or memory disjoint from both; it partially overlaps {victim}$"
    _raises_unchanged(msg, call, buf, a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_out_overlapping_from_the_other_side_is_refused(device):
    buf = torch.randn(101).to(device)
    a, out = buf[1:], buf[:-1]
    b = torch.randn(100).to(device)
    _raises_unchanged(r"^out: .* partially overlaps a$", lambda: _integrate(a, b, out), buf, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("target", ["a", "b", "disjoint_slice"])
def test_exact_alias_and_disjoint_slices_are_allowed(device, target):
    buf = torch.randn(300, generator=torch.Generator().manual_seed(3)).to(device)
    a, b = buf[:100], buf[100:200]
    expected_out, stats, coeffs, cases = ref.integrate(a.clone(), b.clone(), OFFSETS)
    out = {"a": a, "b": b, "disjoint_slice": buf[200:]}[target]
    got = _integrate(a, b, out)
    torch.testing.assert_close(out.cpu(), expected_out.cpu())
    torch.testing.assert_close(got[2].cpu(), coeffs.cpu())  # (stats, group_stats, coeffs, cases)


def test_a_and_b_may_overlap_each_other_when_out_is_separate():
    buf = torch.randn(101)
    a, b = buf[:-1], buf[1:]
    out = torch.empty(100)
    _integrate(a, b, out)
    torch.testing.assert_close(out, ref.integrate(a.clone(), b.clone(), OFFSETS)[0])


def test_out_equal_to_a_but_overlapping_b_is_refused():
    buf = torch.randn(101)
    a, b = buf[:-1], buf[1:]
    _raises_unchanged(r"^out: .* partially overlaps b$", lambda: _integrate(a, b, a), buf)


# ---- (b) every tensor on the op's device -------------------------------------------------------
def _cpu_kernel(op, *args):
    """Calls the compiled CPU kernel itself (normal dispatch would pick the Meta key)."""
    return getattr(OPS, op).default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


def _meta(t):
    return t.to("meta")


def _cpu_device_cases():
    """(message, (op, *args), tensors that must stay unchanged)."""
    a, b = _pair()
    out = torch.zeros(100)
    act = torch.ones(G, dtype=torch.bool)
    coeffs = torch.ones(G, 2)
    stats = torch.rand(G, 3)
    m = _meta

    def integ(a, b, offsets, out, active=None):
        return ("integrate", a, b, offsets, out, "pareto_lora", PARAMS, active)

    def rule(stats, active=None):
        return ("rule_coefficients", stats, "pareto_lora", PARAMS, active)

    yield "a: expected device cpu, got meta", integ(m(a), m(b), OFFSETS, m(out)), (out,)
    yield "a: expected device cpu, got meta", ("combine", m(a), m(b), OFFSETS, m(coeffs), m(out)), ()
    yield "a: expected device cpu, got meta", ("segment_stats", m(a), m(b), OFFSETS), ()
    yield "b: expected device cpu (same as a), got meta", integ(a, m(b), OFFSETS, out), (a, out)
    yield "out: expected device cpu (same as a), got meta", integ(a, b, OFFSETS, m(out)), (a, b)
    yield "offsets: expected device cpu, got meta", integ(a, b, m(OFFSETS), out), (a, b, out)
    yield "offsets: expected device cpu, got meta", ("segment_stats", a, b, m(OFFSETS)), (a, b)
    yield "active: expected device cpu, got meta", integ(a, b, OFFSETS, out, m(act)), (a, b, out)
    yield "coeffs: expected device cpu (same as a), got meta", ("combine", a, b, OFFSETS, m(coeffs), out), (a, b, out)
    yield "stats: expected device cpu, got meta", rule(m(stats)), ()
    yield "active: expected device cpu (same as stats), got meta", rule(stats, m(act)), (stats,)


def _exactly(message):
    return "^" + message.replace("(", r"\(").replace(")", r"\)") + "$"


_CPU_DEVICE_CASES = list(_cpu_device_cases())


@pytest.mark.parametrize(
    "message,call,unchanged", _CPU_DEVICE_CASES, ids=[f"{c[1][0]}-{c[0].split(':')[0]}" for c in _CPU_DEVICE_CASES]
)
def test_cpu_kernel_refuses_tensors_on_other_devices(message, call, unchanged):
    _raises_unchanged(_exactly(message), lambda: _cpu_kernel(*call), *unchanged)


def test_meta_tensors_still_reach_the_fake_kernels():
    a, b = _pair("meta")
    stats, _, coeffs, cases = OPS.integrate(a, b, OFFSETS, torch.empty_like(a), "pareto_lora", PARAMS, None)
    assert stats.shape == (G, 3) and coeffs.shape == (G, 2) and cases.shape == (G,)
    groups = torch.tensor([0, 1, G], device="meta")
    stats, group_stats, coeffs, cases = OPS.integrate(
        a, b, OFFSETS, torch.empty_like(a), "pareto_lora", PARAMS, None, groups,
        torch.zeros((), dtype=torch.bool, device="meta"), torch.empty(G, 3, dtype=torch.float64, device="meta"))
    assert stats.shape == (G, 3) and group_stats.shape == (2, 3) and coeffs.shape == (2, 2) and cases.shape == (2,)
    assert OPS.segment_stats(a, b, OFFSETS).shape == (G, 3)


@gpu
def test_cuda_kernel_refuses_meta_and_misplaced_tensors():
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    a, b = _pair("cuda")
    out = torch.zeros_like(a)
    dev = a.device
    for message, args in [
        ("a: expected a CUDA tensor (other arguments are on the GPU), got device meta",
         (_meta(a), _meta(b), OFFSETS, _meta(out))),
        (f"offsets: expected device cpu or {dev}, got meta", (a, b, _meta(OFFSETS), out)),
        (f"b: expected device {dev} (same as a), got meta", (a, _meta(b), OFFSETS, out)),
        (f"out: expected device {dev} (same as a), got meta", (a, b, OFFSETS, _meta(out))),
    ]:
        call = lambda: OPS.integrate.default.redispatch(cuda, *args, "pareto_lora", PARAMS, None)  # noqa: E731
        _raises_unchanged(_exactly(message), call, a, b, out)
    act = _meta(torch.ones(G, dtype=torch.bool))
    args = (a, b, OFFSETS, out, "pareto_lora", PARAMS, act)
    call = lambda: OPS.integrate.default.redispatch(cuda, *args)  # noqa: E731
    _raises_unchanged(f"^active: expected device cpu or {dev}, got meta$", call, a, b, out)


# ---- (c) strided active ------------------------------------------------------------------------
def _strided_mask(device):
    full = torch.tensor([True, False, False, True, True, False], device=device)
    mask = full[::2]  # [True, False, True]: stride 2
    assert not mask.is_contiguous()
    return mask


@pytest.mark.parametrize(
    "device,mask_device",
    [("cpu", "cpu"), pytest.param("cuda", "cpu", marks=gpu), pytest.param("cuda", "cuda", marks=gpu)],
)
def test_strided_active_is_read_by_value(device, mask_device):
    a, b = _pair(device, seed=4)
    mask = _strided_mask(mask_device)
    got = pareto_lora.integrate(a, b, OFFSETS, active=mask, backend="cpp")
    want = pareto_lora.integrate(a, b, OFFSETS, active=mask.contiguous(), backend="cpp")
    assert torch.equal(got.cases, want.cases) and torch.equal(got.out, want.out)
    assert got.cases[1].item() == int(pareto_lora.Case.INACTIVE)
    assert got.cases[0].item() != int(pareto_lora.Case.INACTIVE)
    coeffs, cases = OPS.rule_coefficients(got.stats, "pareto_lora", PARAMS, mask)
    assert torch.equal(cases, want.cases) and torch.equal(coeffs, want.coeffs)

"""The K-objective kernels (gram, combine_many) of every compiled and Triton backend, against the
float64 oracle (pareto_lora.multi.reference): bounds, empty shapes, in place, determinism, the
bits shared with the two-objective ops at K = 2, argument checks (the same ValueError in C++ and
Python, nothing written), torch.library.opcheck, and integrate_many on each backend."""

import inspect
import math

import pytest
import torch

import pareto_lora
from pareto_lora.backends import resolve_backend
from pareto_lora.backends.protocol import Backend
from pareto_lora.multi import reference as R
from pareto_lora.multi.gram import MAX_OBJECTIVES, num_pairs, pairs

OPS = torch.ops.pareto_lora
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# unit roundoff of each dtype, and of the arithmetic the combine runs in for it
U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
# empty segments first, in the middle and last; one segment over two Triton tiles and CPU chunks
OFFSETS = [0, 0, 5, 5, 40000, 40037, 40037]


def _grads(k, n=OFFSETS[-1], dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-buffer scales far apart, so that no accident of magnitudes hides a wrong column
    return [(torch.randn(n, generator=g) * 4.0 ** (i - 2)).to(dtype).to(device) for i in range(k)]


def _impl(backend):
    name, device = backend
    return resolve_backend(name, torch.device(device)), device


def _gram_bound(grads, offsets, rounded_products):
    """n 2^-53 sum |products| per segment and column (n: the segment's length; +1 when the products
    themselves are rounded, float64 inputs), doubled: the oracle's own sums carry as much."""
    seg = R.segment_ids(torch.tensor(offsets), grads[0].device)
    absolute = R.gram_by_ids([g.abs() for g in grads], seg, len(offsets) - 1)
    n = torch.tensor(offsets[1:]) - torch.tensor(offsets[:-1]) + int(rounded_products)
    return 2 * n.to(torch.float64)[:, None].to(absolute.device) * 2.0**-53 * absolute


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", range(2, MAX_OBJECTIVES + 1))
def test_gram_within_the_summation_bound(backend, k, dtype):
    impl, device = _impl(backend)
    grads = _grads(k, dtype=dtype, device=device, seed=k)
    got = impl.gram(grads, OFFSETS)
    want = R.gram(grads, OFFSETS)
    assert got.dtype == torch.float64 and got.shape == (len(OFFSETS) - 1, num_pairs(k))
    assert got.device == grads[0].device
    err = (got - want).abs()
    assert bool((err <= _gram_bound(grads, OFFSETS, dtype == torch.float64)).all()), err.max()
    assert bool((got[[0, 2, 5]] == 0).all())  # empty segments: exact zeros


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_within_n_ulps_of_the_exact_sums(backend, dtype):
    # Against math.fsum of the products (exact: one rounding at the end): every statistic within
    # n 2^-53 sum |products| (float64 inputs: n + 1, the products themselves are rounded).
    impl, device = _impl(backend)
    offsets = [0, 3, 3, 4100, 9000]  # a segment shorter than a lane set, one over two Triton tiles
    grads = _grads(3, n=offsets[-1], dtype=dtype, device=device, seed=11)
    got = impl.gram(grads, offsets).cpu()
    host = [[float(x) for x in g.cpu().to(torch.float64)] for g in grads]
    for s, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        for p, (i, j) in enumerate(pairs(3)):
            terms = [x * y for x, y in zip(host[i][lo:hi], host[j][lo:hi])]
            n = (hi - lo) + (dtype == torch.float64)
            bound = n * 2.0**-53 * math.fsum(abs(t) for t in terms)
            assert abs(got[s, p].item() - math.fsum(terms)) <= bound, (s, p)


def _combine_bound(grads, coeffs, want, dtype):
    # The arithmetic (float32, float64 for float64 buffers) rounds each of K products and K - 1
    # sums (and a float64 coefficient to float32 once), then one rounding to the buffers' dtype.
    u_op = U[torch.float64] if dtype == torch.float64 else U[torch.float32]
    seg = R.segment_ids(torch.tensor(OFFSETS), want.device)
    mag = R.combine_many_by_ids([g.abs() for g in grads], seg, coeffs.abs())
    arith = 2 * (len(grads) + 1) * u_op * mag
    return U[dtype] * (want.abs() + arith) + arith


@pytest.mark.parametrize("coeff_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [2, 3, 5, MAX_OBJECTIVES])
def test_combine_many_within_rounding(backend, k, dtype, coeff_dtype):
    impl, device = _impl(backend)
    grads = _grads(k, dtype=dtype, device=device, seed=k)
    coeffs = torch.randn(len(OFFSETS) - 1, k, generator=torch.Generator().manual_seed(1)).to(coeff_dtype).to(device)
    got = impl.combine_many(grads, OFFSETS, coeffs)
    assert got.dtype == dtype and got.shape == grads[0].shape
    want = R.combine_many_by_ids(grads, R.segment_ids(torch.tensor(OFFSETS), grads[0].device), coeffs)
    err = (got.to(torch.float64) - want).abs()
    assert bool((err <= _combine_bound(grads, coeffs, want, dtype)).all()), err.max()
    # in place, into the first and the last buffer: the same bits as out of place
    for j in (0, k - 1):
        inplace = [g.clone() for g in grads]
        out = impl.combine_many(inplace, OFFSETS, coeffs, out=inplace[j])
        assert out.data_ptr() == inplace[j].data_ptr() and torch.equal(out, got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k2_is_the_two_objective_pair_bit_for_bit(backend, dtype):
    impl, device = _impl(backend)
    a, b = _grads(2, dtype=dtype, device=device, seed=3)
    for coeff_dtype in (torch.float32, torch.float64):
        coeffs = torch.randn(len(OFFSETS) - 1, 2, generator=torch.Generator().manual_seed(2)).to(coeff_dtype)
        coeffs = coeffs.to(device)
        assert torch.equal(impl.combine_many([a, b], OFFSETS, coeffs), impl.combine(a, b, OFFSETS, coeffs))
    # gram's (0,0), (0,1), (1,1) are segment_stats' aa, ab, bb where the summation order is the same:
    # the CPU sums bf16/fp16 products in double (segment_stats: in float32 blocks first).
    if backend[0] == "cpp" and dtype in (torch.bfloat16, torch.float16):
        return
    stats = impl.segment_stats(a, b, OFFSETS)
    assert torch.equal(impl.gram([a, b], OFFSETS), stats[:, [0, 2, 1]])


def test_empty_shapes(backend):
    impl, device = _impl(backend)
    for offsets, n in (([0], 0), ([0, 0, 0], 0)):
        grads = [torch.empty(n, device=device) for _ in range(3)]
        st = impl.gram(grads, offsets)
        assert st.shape == (len(offsets) - 1, 6) and bool((st == 0).all())
        out = impl.combine_many(grads, offsets, torch.ones(len(offsets) - 1, 3, device=device))
        assert out.shape == (0,)


def test_bitwise_reproducible(backend):
    impl, device = _impl(backend)
    grads = _grads(4, device=device)
    coeffs = torch.rand(len(OFFSETS) - 1, 4, device=device)
    runs = [(impl.gram(grads, OFFSETS), impl.combine_many(grads, OFFSETS, coeffs)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_thread_count_and_build_do_not_change_the_gram(dtype, monkeypatch):
    # Many chunks over several segments, so that two threads split them differently from one.
    offsets = [0, 70001, 70001, 200000]
    grads = _grads(5, n=offsets[-1], dtype=dtype)
    coeffs = torch.rand(3, 5, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (OPS.gram(grads, torch.tensor(offsets)), pareto_lora.combine_many(grads, offsets, coeffs, backend="cpp"))
        torch.set_num_threads(2)
        two = (OPS.gram(grads, torch.tensor(offsets)), pareto_lora.combine_many(grads, offsets, coeffs, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    # every CPU build sums in the same order; the combine follows each build's two-objective combine
    for cap in pareto_lora._C.cpu_capabilities():
        monkeypatch.setenv("PARETO_LORA_CPU_CAPABILITY", cap)
        assert torch.equal(OPS.gram(grads, torch.tensor(offsets)), one[0]), cap
        c2 = coeffs[:, :2].contiguous()
        assert torch.equal(pareto_lora.combine_many(grads[:2], offsets, c2, backend="cpp"),
                           pareto_lora.backends.cpp.combine(grads[0], grads[1], offsets, c2)), cap


# ---- argument checks: the Python wrapper and the C++ op raise the same message ------------------
def _bad_cases():
    """(label, make(grads, coeffs, out) -> (grads, offsets, coeffs, out), message) with K = 3, S = 3."""
    off = torch.tensor([0, 10, 10, 30])
    return [
        ("one", lambda g, c, o: (g[:1], off, c, o), r"^grads: expected 2 to 8 tensors \(one per objective\), got 1$"),
        ("nine", lambda g, c, o: (g * 3, off, c, o), r"^grads: expected 2 to 8 tensors \(one per objective\), got 9$"),
        ("int", lambda g, c, o: ([g[0], g[1].int(), g[2]], off, c, o),
         r"^grads\[1\]: expected dtype float32, bfloat16, float16 or float64, got int32$"),
        ("strided", lambda g, c, o: ([g[0], g[1], torch.zeros(60)[::2]], off, c, o),
         r"^grads\[2\]: expected a contiguous tensor \(flat gradient buffer\)$"),
        ("numel", lambda g, c, o: ([g[0], g[1], g[2][:29]], off, c, o),
         r"^grads\[2\]: expected numel 30 \(same as grads\[0\]\), got 29$"),
        ("dtype", lambda g, c, o: ([g[0], g[1].double(), g[2]], off, c, o),
         r"^grads\[1\]: expected dtype float32 \(same as grads\[0\]\), got float64$"),
        ("offsets", lambda g, c, o: (g, torch.tensor([0, 10, 31]), c, o),
         r"^offsets: expected offsets\[-1\] == numel == 30, got 31$"),
        ("coeffs dtype", lambda g, c, o: (g, off, c.half(), o), r"^coeffs: expected dtype float32 or float64, got float16$"),
        ("coeffs shape", lambda g, c, o: (g, off, c[:, :2], o),
         r"^coeffs: expected shape \[3, 3\] \(one weight per segment and objective\), got \(3, 2\)$"),
        ("coeffs 1-D", lambda g, c, o: (g, off, c[0], o),
         r"^coeffs: expected shape \[3, 3\] \(one weight per segment and objective\), got \(3,\)$"),
        ("out numel", lambda g, c, o: (g, off, c, o[:29]), r"^out: expected numel 30 \(same as grads\[0\]\), got 29$"),
        ("out dtype", lambda g, c, o: (g, off, c, o.double()),
         r"^out: expected dtype float32 \(same as grads\[0\]\), got float64$"),
        ("out grad", lambda g, c, o: (g, off, c, o.requires_grad_()), r"^out: expected a tensor that does not require grad"),
        ("out overlap", lambda g, c, o: (g, off, c, "shifted"),
         r"^out: expected one of grads or memory disjoint from all; it partially overlaps grads\[1\]$"),
    ]


@pytest.mark.parametrize("label,make,message", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_arguments_same_message_nothing_written(backend, label, make, message):
    impl, device = _impl(backend)
    if device != "cpu" and label == "strided":
        pytest.skip("the same check on every device; built on the CPU here")
    base = torch.randn(70)
    grads = [torch.randn(30), base[10:40], torch.randn(30)]
    g, off, c, out = make(grads, torch.rand(3, 3, dtype=torch.float64), torch.zeros(30))
    if isinstance(out, str):  # a view of grads[1]'s memory, shifted by five elements
        out = base[15:45]
    g = [t.to(device) if t.device.type == "cpu" and device != "cpu" else t for t in g]
    before = [t.clone() for t in (*g, out, base)]
    calls = [lambda: impl.combine_many(g, off, c.to(device), out.to(device) if device != "cpu" else out)]
    if not label.startswith(("coeffs", "out")):
        calls.append(lambda: impl.gram(g, off))
    if backend[0] == "cpp":  # the op itself, past the Python checks
        calls.append(lambda: OPS.combine_many(g, off, c, out))
        if not label.startswith(("coeffs", "out")):
            calls.append(lambda: OPS.gram(g, off))
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()
    for t, was in zip((*g, out, base), before):
        assert torch.equal(t.detach(), was)


def test_the_cpp_bound_on_k_is_rules_max_objectives():
    grads = [torch.zeros(4)] * (MAX_OBJECTIVES + 1)
    with pytest.raises(ValueError, match=rf"^grads: expected 2 to {MAX_OBJECTIVES} tensors"):
        OPS.gram(grads, torch.tensor([0, 4]))
    assert OPS.gram(grads[:MAX_OBJECTIVES], torch.tensor([0, 4])).shape == (1, num_pairs(MAX_OBJECTIVES))


def test_opcheck_both_ops():
    grads = _grads(3, n=300)
    offsets = torch.tensor([0, 100, 100, 300])
    torch.library.opcheck(OPS.gram, (grads, offsets))
    torch.library.opcheck(OPS.combine_many, (grads, offsets, torch.rand(3, 3), torch.empty(300)))
    torch.library.opcheck(OPS.combine_many, (grads, offsets, torch.rand(3, 3, dtype=torch.float64), torch.empty(300)))


def test_both_backends_implement_the_protocol_functions():
    for name in pareto_lora.available_backends("cpu"):
        module = resolve_backend(name, torch.device("cpu"))
        assert isinstance(module, Backend), name
        for fn in ("gram", "combine_many"):
            want = [p.name for p in inspect.signature(getattr(Backend, fn)).parameters.values() if p.name != "self"]
            assert list(inspect.signature(getattr(module, fn)).parameters) == want, (name, fn)


# ---- the composition (ops_many.integrate_many) on each backend ---------------------------------
@pytest.mark.parametrize("rule,params", [("mean", {}), ("constant", {"weights": (1.0, 0.5, 2.0, 0.25)})])
def test_integrate_many_matches_the_reference(backend, rule, params):
    name, device = backend
    grads = _grads(4, device=device, seed=7)
    groups = torch.tensor([0, 2, 6])
    kw = dict(groups=groups, active=torch.tensor([True, False]), **params)
    got = pareto_lora.integrate_many(grads, OFFSETS, rule, backend=name, **kw)
    want = pareto_lora.integrate_many([g.cpu() for g in grads], OFFSETS, rule, backend="reference", **kw)
    bound = _gram_bound([g.cpu() for g in grads], OFFSETS, False)
    assert bool(((got.stats.cpu() - want.stats).abs() <= bound).all())
    assert torch.equal(got.cases.cpu(), want.cases)
    assert torch.allclose(got.weights.cpu(), want.weights, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.out.cpu(), want.out, rtol=4 * 2.0**-24 * 4, atol=1e-6)
    # in place into grads[0], the given statistics replace the Gram pass
    out = pareto_lora.integrate_many(grads, OFFSETS, rule, backend=name, out=grads[0], stats=want.stats.to(device), **kw)
    assert out.out.data_ptr() == grads[0].data_ptr()
    assert torch.equal(out.stats.cpu(), want.stats)
    torch.testing.assert_close(out.out.cpu(), want.out, rtol=4 * 2.0**-24 * 4, atol=1e-6)


def test_triton_opcheck_both_ops():
    """Schema (declared mutations are the real ones) and autograd registration; the fake-tensor and
    AOT checks need traceable kernels, i.e. a GPU (the interpreter is opaque to torch.compile)."""
    if "triton" not in pareto_lora.available_backends("cpu") and not torch.cuda.is_available():
        pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    from pareto_lora.backends.triton import ops as T
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grads = _grads(3, n=300, device=device)
    tiles, seg_tiles = T.tile_table(torch.tensor([0, 100, 100, 300]), torch.device(device))
    utils = ("test_schema", "test_autograd_registration")
    if device == "cuda":
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    ops = torch.ops.pareto_lora_triton
    torch.library.opcheck(ops.gram, (grads, tiles, seg_tiles), test_utils=utils)
    coeffs = torch.rand(3, 3, device=device)
    torch.library.opcheck(ops.combine_many, (grads, tiles, coeffs, torch.empty_like(grads[0])), test_utils=utils)
    assert T.gram.__module__ == "pareto_lora.backends.triton.multi"


@pytest.mark.parametrize("rule", ["mean", "upgrad", "imtl_g"])
def test_k_objective_step_under_torch_compile(rule):
    """The Gram op, a weighting on the batched Gram (torch ops) and the combine op in one compiled graph
    (fullgraph: the fake kernels give the shapes; no graph break between the two launches)."""
    from pareto_lora import RuleSpec
    from pareto_lora.multi import gram_matrix
    from pareto_lora.multi.weightings import WEIGHTINGS
    from pareto_lora.multi.weightings.base import prepare

    grads, offsets = _grads(3, n=300), torch.tensor([0, 100, 100, 300])
    spec = RuleSpec(rule)

    def step(g0, g1, g2, offsets):
        stats = torch.ops.pareto_lora.gram([g0, g1, g2], offsets)
        valid, _ = prepare(gram_matrix(stats, 3))
        w, _ = WEIGHTINGS[rule](valid, spec)
        out = torch.empty_like(g0)
        torch.ops.pareto_lora.combine_many([g0, g1, g2], offsets, w.to(torch.float32), out)
        return out, stats, w

    eager = step(*grads, offsets)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*grads, offsets)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)

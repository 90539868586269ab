"""The CUDA kernels (csrc/cuda) run on the CPU by the emulation of tools/cuda_emu/, on every machine.

The real kernel headers are compiled by g++ through a CUDA shim; each block is an OS thread, its
256 threads fibers, so the persistent ticket loop, the cross-block counters, the fused plan's
ready flags, the one-pass tiles and the group epilogue in the last block out really run. The
checks are those test_cuda.py / test_multi_kernels.py make on a GPU (as far as they concern the
kernels): statistics against the float64 reference, the rule on the kernel's own statistics, the
combine to a few units of rounding, the same bits for every plan and grid size, counters back at
zero after every launch; the checks that concern the block reductions also with 64-lane warps.
What the emulation cannot show (weak memory ordering, lock-step warps, FMA contraction):
docs/cuda.md.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import pareto_lora
from pareto_lora import Case, RuleSpec
from pareto_lora import reference as ref
from pareto_lora.multi import reference as R
from _cuda_inputs import make_pair, offsets_from_sizes, random_sizes
from test_cuda import PLANS as CUDA_PLANS
from test_cuda import assert_combined, assert_stats_close, check_against_reference
from test_multi_kernels import OFFSETS, _combine_bound, _gram_bound, _grads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (plan, one-pass tiles): test_cuda.PLANS, the environment flag as a bool
PLANS = tuple((plan, one_pass == "1") for plan, one_pass in CUDA_PLANS.values())
FIELDS = ("out", "stats", "coeffs", "cases")


def _load_emu():
    spec = importlib.util.spec_from_file_location("cuda_emu_emu", os.path.join(ROOT, "tools", "cuda_emu", "emu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EMU = _load_emu()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The emulation runs up to 4 OS threads per launch; torch's own thread pool on top of them
    oversubscribes CI's 2 cores (the reference's ops then wait on descheduled threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _emulator(tmp_path_factory, warp_size):
    if EMU.compiler() is None:
        pytest.skip("no C++ compiler (g++) on PATH to build the CUDA emulation")
    emu = EMU.Emulator(EMU.build(str(tmp_path_factory.mktemp("cuda_emu")), warp_size=warp_size))
    assert emu.warp_size == warp_size
    return emu


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulation with 32-lane warps (NVIDIA)."""
    return _emulator(tmp_path_factory, 32)


@pytest.fixture(scope="module")
def emu64(tmp_path_factory):
    """With 64-lane warps: the CDNA wavefronts tools/compile_hip.py compiles for (other shuffle
    trees, 4 warps per block in the reductions' scratch)."""
    return _emulator(tmp_path_factory, 64)


@pytest.fixture(params=["warp32", "warp64"])
def any_emu(request):
    """Both warp widths: the checks that concern the block reductions."""
    return request.getfixturevalue("emu" if request.param == "warp32" else "emu64")


def _result(t):
    return pareto_lora.IntegrationResult(*t[:4], group_stats=t[4])


def _assert_counters_zero(emu):
    assert not bool(emu.workspace.any()), "workspace counters not reset by the launch"


GUARD = 48  # elements around every buffer: NaN around inputs, a canary around outputs


def _guarded(t, fill=float("nan")):
    """t inside a larger buffer filled with `fill`: a kernel reading out of bounds gets NaN (which
    the value checks catch), one writing out of bounds changes the fill (_assert_guard)."""
    buf = torch.full((t.numel() + 2 * GUARD,), fill, dtype=t.dtype)
    buf[GUARD : GUARD + t.numel()] = t
    return buf[GUARD : GUARD + t.numel()]


def _assert_guard(view, fill=7.0):
    whole = view.as_strided((view.numel() + 2 * GUARD,), (1,), view.storage_offset() - GUARD)
    assert bool((whole[:GUARD] == fill).all()) and bool((whole[-GUARD:] == fill).all()), "write out of bounds"


def _layouts(dtype, tile):
    """Segment layouts: one segment of several tiles (and a partial one), many tiny segments with
    empty ones, LoRA-like mixed sizes (one-tile segments, exact tile multiples, empties)."""
    return {
        "one_large": [3 * tile + 77],
        "tiny": random_sizes(90, 40, seed=1),
        "lora": [0, 4096, 16, tile, 1, 2 * tile, 0, 3000, tile + 1, 7, 0],
    }


# ---- the emulation itself ----------------------------------------------------------------------------
def test_the_emulation_computes_shuffles_and_barriers_and_reports_broken_kernels(any_emu):
    assert any_emu.selftest(0) == (0, "")  # warp shuffle tree, out-of-warp lanes, shared memory + barrier
    assert any_emu.selftest(4) == (0, "")  # a cross-block flag handoff between two concurrent blocks
    for case in (1, 6):  # the threads that skip the barrier exit after / before the others wait
        rc, msg = any_emu.selftest(case)
        assert rc == 1 and "__syncthreads reached by part of the block" in msg, case
    rc, msg = any_emu.selftest(2)
    assert rc == 1 and "__syncthreads mismatch" in msg
    rc, msg = any_emu.selftest(3)
    assert rc == 1 and "WARP_SHFL_DOWN mismatch" in msg
    rc, msg = any_emu.selftest(5, timeout_s=0.5)  # a flag never raised: the deadline, not a hang
    assert rc == 1 and "deadline" in msg


# ---- integrate: every plan, grid size and layout -----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["one_large", "tiny", "lora"])
def test_every_plan_and_grid_size_gives_the_same_bits(any_emu, dtype, layout):
    offsets = offsets_from_sizes(_layouts(dtype, any_emu.tile_elems(dtype))[layout])
    a, b = (_guarded(x) for x in make_pair(offsets, dtype, seed=3, device="cpu"))
    first = None
    for plan, one_pass in PLANS:
        for blocks in (1, 2, 4) if (plan, one_pass) != PLANS[0] else (4, 3):
            out = _guarded(torch.empty_like(a), 7.0)
            res = _result(any_emu.integrate(a, b, offsets, RuleSpec("pareto_lora"), out=out, plan=plan,
                                            one_pass=one_pass, max_blocks=blocks))
            _assert_counters_zero(any_emu)
            _assert_guard(out)
            if first is None:
                first = res
                check_against_reference(res, a, b, offsets, "pareto_lora")
                continue
            for f in FIELDS:
                assert torch.equal(getattr(res, f), getattr(first, f)), (plan, one_pass, blocks, f)
    # segment_stats runs the same reduce tiles (test_cuda.test_every_plan_agrees_bitwise)
    assert torch.equal(any_emu.segment_stats(a, b, offsets, max_blocks=2), first.stats)
    _assert_counters_zero(any_emu)


@pytest.mark.parametrize("plan", ["fused", "two_pass"])
def test_shuffled_schedules_and_blocks_that_are_not_co_resident(any_emu, plan):
    """Fibers in seeded random orders with extra OS yields, and 4 blocks on fewer OS threads (a
    block starts only when another has exited: schedule.h's forward-progress argument): the same
    bits, no deadlock, counters at zero."""
    offsets = offsets_from_sizes(_layouts(torch.float32, any_emu.tile_elems(torch.float32))["lora"] + [5000] * 6)
    a, b = make_pair(offsets, torch.float32, seed=4, device="cpu")
    groups = torch.tensor([0, 3, 3, offsets.numel() - 1])
    spec = RuleSpec("mmpareto")
    base = _result(any_emu.integrate(a, b, offsets, spec, plan=plan, max_blocks=4))
    base_g = any_emu.integrate(a, b, offsets, spec, groups=groups, max_blocks=4)
    try:
        for seed, workers in ((1, 4), (2, 4), (3, 2), (0, 1), (0, 2)):
            any_emu.seed = seed
            res = _result(any_emu.integrate(a, b, offsets, spec, plan=plan, max_blocks=4, workers=workers))
            _assert_counters_zero(any_emu)
            for f in FIELDS:
                assert torch.equal(getattr(res, f), getattr(base, f)), (seed, workers, f)
            grouped = any_emu.integrate(a, b, offsets, spec, groups=groups, max_blocks=4, workers=workers)
            _assert_counters_zero(any_emu)
            assert all(torch.equal(x, y) for x, y in zip(grouped, base_g)), (seed, workers)
    finally:
        any_emu.seed = 0


@pytest.mark.parametrize("rule", ["sum", "pareto_lora", "mgda", "mmpareto", "upgrad", "cagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rules_with_active_match_the_reference(emu, rule, dtype):
    offsets = offsets_from_sizes(random_sizes(60, 20_000, seed=2))
    a, b = make_pair(offsets, dtype, seed=2, device="cpu")
    g = offsets.numel() - 1
    active = torch.rand(g, generator=torch.Generator().manual_seed(2)) > 0.3
    spec = RuleSpec(rule, tau=0.7, gamma=1.3)
    results = []
    for plan, on_host in (("fused", True), ("two_pass", False)):
        res = _result(emu.integrate(a, b, offsets, spec, active=active, active_on_host=on_host, plan=plan, max_blocks=3))
        _assert_counters_zero(emu)
        check_against_reference(res, a, b, offsets, rule, tau=0.7, gamma=1.3, active=active)
        assert bool((res.cases[~active] == int(Case.INACTIVE)).all())
        results.append(res)
    for f in FIELDS:
        assert torch.equal(getattr(results[0], f), getattr(results[1], f)), f
    # the CPU op decides the same cases (its statistics differ from the tiles' in the last bits only)
    cpu = pareto_lora.integrate(a, b, offsets, rule=rule, tau=0.7, gamma=1.3, active=active, backend="cpp")
    assert (cpu.cases == results[0].cases).float().mean() > 0.95


@pytest.mark.parametrize("rule", pareto_lora.RULES)
def test_every_rule_runs_in_the_kernels_as_the_reference_decides(emu, rule):
    # every rule of RULES on the CUDA backend: rule_kernel alone on reference statistics, then the
    # fused launch, whose coefficients are the reference rule on its own statistics
    offsets = offsets_from_sizes(random_sizes(300, 64, seed=5))  # short segments: every angle
    a, b = make_pair(offsets, torch.float32, seed=5, device="cpu")
    spec = RuleSpec(rule, weights=(0.5, 2.0)) if rule == "constant" else RuleSpec(rule, tau=0.7, gamma=1.3)
    for st in (ref.segment_stats(a, b, offsets), _result(emu.integrate(a, b, offsets, spec, max_blocks=2)).stats):
        got_c, got_k = emu.rule_coefficients(st, spec)
        want_c, want_k = ref.rule_coefficients(st, spec)
        assert torch.equal(got_k, want_k.to(torch.int32))
        torch.testing.assert_close(got_c, want_c.float(), rtol=1e-6, atol=1e-7)
    res = _result(emu.integrate(a, b, offsets, spec, max_blocks=2))
    _assert_counters_zero(emu)
    assert torch.equal(res.cases, got_k) and torch.equal(res.coeffs, got_c)
    assert_combined(res.out, a, b, offsets, res.coeffs)


def test_every_rule_case_shows_up_and_matches(emu):
    offsets = offsets_from_sizes(random_sizes(400, 3000, seed=1))
    a, b = make_pair(offsets, torch.float32, seed=1, device="cpu")
    res = _result(emu.integrate(a, b, offsets, RuleSpec("pareto_lora"), max_blocks=4))
    check_against_reference(res, a, b, offsets, "pareto_lora")
    counts = torch.bincount(res.cases.long(), minlength=7)
    for case in (Case.SUMMED, Case.RESCALED, Case.PARETO, Case.DEGENERATE):
        assert counts[int(case)] > 0, f"test data never hit case {case!r}"


@pytest.mark.parametrize("plan", ["fused", "two_pass"])
def test_misaligned_views_take_the_scalar_head_and_tail(emu, plan):
    offsets = offsets_from_sizes([0, 5000, 3, 9000, 17, 0, 20000])
    n = int(offsets[-1])
    a0, b0 = (_guarded(x) for x in make_pair(offsets_from_sizes([n + 3]), torch.float32, seed=8, device="cpu"))
    for sa, sb, so in [(1, 1, 1), (0, 1, 0), (1, 0, 2), (3, 3, 0), (2, 2, 2)]:
        a, b = a0[sa : sa + n], b0[sb : sb + n]
        base = _guarded(torch.full((n + 3,), 7.0), 7.0)
        out = base[so : so + n]
        res = _result(emu.integrate(a, b, offsets, RuleSpec("pareto_only"), out=out, plan=plan, max_blocks=2))
        _assert_counters_zero(emu)
        whole = base.as_strided((n + 3 + 2 * GUARD,), (1,), base.storage_offset() - GUARD)
        assert bool((whole[: GUARD + so] == 7.0).all()) and bool((whole[GUARD + so + n :] == 7.0).all())
        check_against_reference(res, a, b, offsets, "pareto_only")


@pytest.mark.parametrize("target", ["a", "b"])
@pytest.mark.parametrize("plan", ["fused", "two_pass"])
def test_out_aliasing_a_or_b(emu, target, plan):
    offsets = offsets_from_sizes(random_sizes(40, 30_000, seed=7))
    a, b = make_pair(offsets, torch.float32, seed=7, device="cpu")
    expected = _result(emu.integrate(a, b, offsets, RuleSpec("pareto_lora"), plan=plan, max_blocks=3))
    a2, b2 = a.clone(), b.clone()
    out = a2 if target == "a" else b2
    res = _result(emu.integrate(a2, b2, offsets, RuleSpec("pareto_lora"), out=out, plan=plan, max_blocks=3))
    assert torch.equal(out, expected.out) and torch.equal(res.stats, expected.stats)


def test_empty_segments_and_empty_buffers(emu):
    e = torch.empty(0)
    out, st, co, ca, _ = emu.integrate(e, e.clone(), torch.tensor([0]), RuleSpec())
    assert st.shape == (0, 3) and co.shape == (0, 2) and ca.shape == (0,)
    out, st, co, ca, _ = emu.integrate(e, e.clone(), torch.tensor([0, 0, 0, 0]), RuleSpec("mgda"))
    assert torch.equal(st, torch.zeros(3, 3)) and bool((ca == int(Case.DEGENERATE)).all())
    _assert_counters_zero(emu)
    offsets = torch.tensor([0, 0, 5, 5, 6, 6])
    a, b = make_pair(offsets, torch.float32, seed=10, device="cpu")
    for plan, one_pass in PLANS:
        res = _result(emu.integrate(a, b, offsets, RuleSpec(), plan=plan, one_pass=one_pass))
        check_against_reference(res, a, b, offsets, "pareto_lora")
        _assert_counters_zero(emu)


def test_repeated_launches_reuse_the_self_resetting_counters(emu):
    """One workspace, zeroed once and grown by doubling (ops_cuda.cu workspace()), many launches."""
    for i, g in enumerate([3, 200, 1, 500, 40, 200]):
        offsets = offsets_from_sizes(random_sizes(g, 3000, seed=20 + i))
        a, b = make_pair(offsets, torch.float32, seed=20 + i, device="cpu")
        res = _result(emu.integrate(a, b, offsets, RuleSpec("pareto_lora"), plan=("fused", "two_pass")[i % 2],
                                    one_pass=i % 3 != 0, max_blocks=1 + i % 4))
        _assert_counters_zero(emu)
        check_against_reference(res, a, b, offsets, "pareto_lora")


def test_run_to_run_bitwise(emu):
    offsets = offsets_from_sizes(random_sizes(100, 30_000, seed=5))
    a, b = make_pair(offsets, torch.bfloat16, seed=5, device="cpu")
    first = _result(emu.integrate(a, b, offsets, RuleSpec("mmpareto"), max_blocks=4))
    for _ in range(2):
        again = _result(emu.integrate(a, b, offsets, RuleSpec("mmpareto"), max_blocks=4))
        for f in FIELDS:
            assert torch.equal(getattr(first, f), getattr(again, f)), f


# ---- the separate ops ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_separate_ops_match_the_reference(emu, dtype):
    offsets = offsets_from_sizes(random_sizes(50, 30_000, seed=11))
    a, b = make_pair(offsets, dtype, seed=11, device="cpu")
    stats = emu.segment_stats(a, b, offsets, max_blocks=3)
    assert_stats_close(stats, ref.segment_stats(a, b, offsets), dtype)
    active = torch.arange(50) % 7 != 0
    for st in (stats, stats.float()):
        for act in (None, active):
            coeffs, cases = emu.rule_coefficients(st, RuleSpec("mmpareto", tau=0.4, gamma=0.9, symmetric=True), act)
            want_c, want_k = pareto_lora.rule_coefficients(st, "mmpareto", 0.4, act, 0.9, True, backend="reference")
            torch.testing.assert_close(cases, want_k.to(torch.int32), rtol=0, atol=0)
            torch.testing.assert_close(coeffs, want_c.float(), rtol=1e-6, atol=1e-7)
    # rule_kernel over several blocks (one thread per segment, 256 per block)
    many = offsets_from_sizes(random_sizes(700, 50, seed=12))
    x, y = make_pair(many, dtype, seed=12, device="cpu")
    st = ref.segment_stats(x, y, many)
    got_c, got_k = emu.rule_coefficients(st, RuleSpec("upgrad"))
    want_c, want_k = pareto_lora.rule_coefficients(st, "upgrad", backend="reference")
    assert torch.equal(got_k, want_k.to(torch.int32))
    torch.testing.assert_close(got_c, want_c.float(), rtol=1e-6, atol=1e-7)
    for c in (coeffs, coeffs.double()):
        out = emu.combine(a, b, offsets, c, torch.empty_like(a), max_blocks=2)
        _assert_counters_zero(emu)
        assert_combined(out, a, b, offsets, c)


# ---- the grouped training step ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_step(any_emu, dtype):
    sizes = random_sizes(60, 20_000, seed=31)
    offsets = offsets_from_sizes(sizes)
    groups = torch.tensor([0, 1, 20, 20, 59, 60])
    a, b = make_pair(offsets, dtype, seed=31, device="cpu")
    for blocks in (1, 4):
        out, st, co, ca, gs = any_emu.integrate(a, b, offsets, RuleSpec("pareto_lora"), groups=groups, max_blocks=blocks)
        _assert_counters_zero(any_emu)
        assert_stats_close(st, ref.segment_stats(a, b, offsets), dtype)
        assert torch.equal(gs, ref.group_sums(st, groups))  # the last block out adds rows left to right
        want_c, want_k = pareto_lora.rule_coefficients(gs, "pareto_lora", backend="reference")
        assert torch.equal(ca, want_k.to(torch.int32)) and torch.equal(co, want_c.float())
        seg_c = co[ref.segment_groups(groups, offsets.numel() - 1)]
        assert torch.equal(out, any_emu.combine(a, b, offsets, seg_c, torch.empty_like(a)))
        assert_combined(out, a, b, offsets, seg_c)


def test_poison_and_given_stats(emu):
    offsets = offsets_from_sizes([4096, 100, 0, 70_000, 5])
    groups = torch.tensor([0, 2, 5])
    a, b = make_pair(offsets, torch.float32, seed=32, device="cpu")
    clean = emu.integrate(a, b, offsets, RuleSpec(), groups=groups, poison=torch.tensor(False))
    torch.testing.assert_close(clean[0], ref.integrate(a, b, offsets, groups=groups).out, rtol=1e-5, atol=1e-5)
    on = emu.integrate(a, b, offsets, RuleSpec(), groups=groups, poison=torch.tensor(True))
    _assert_counters_zero(emu)
    assert bool(on[0].isnan().all()) and bool((on[3] == int(Case.NONFINITE)).all())
    assert torch.equal(on[2], clean[2]) and torch.equal(on[1], clean[1])
    # given statistics: group_rule_kernel alone, then the combine; also without groups
    for grp in (groups, None):
        given = ref.segment_stats(a, b, offsets) * 1.5
        out, st, co, ca, gs = emu.integrate(a, b, offsets, RuleSpec("mgda"), groups=grp, stats=given)
        want = ref.integrate(a, b, offsets, spec=RuleSpec("mgda"), groups=grp, stats=given)
        assert torch.equal(st, given) and torch.equal(gs, want.group_stats) and torch.equal(ca, want.cases)
        torch.testing.assert_close(co, want.coeffs, rtol=1e-6, atol=1e-7)


# ---- the K-objective kernels (multi_ops.cu) -----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_and_combine_many_for_every_k(any_emu, dtype):
    offsets = torch.tensor(OFFSETS)
    for k in range(2, 9):
        grads = [_guarded(g) for g in _grads(k, dtype=dtype, seed=k)]
        got = any_emu.gram(grads, offsets)
        want = R.gram(grads, OFFSETS)
        assert bool(((got - want).abs() <= _gram_bound(grads, OFFSETS, dtype == torch.float64)).all()), k
        assert bool((got[[0, 2, 5]] == 0).all())
        for coeff_dtype in (torch.float32, torch.float64) if k in (2, 3, 5, 8) else ():
            coeffs = torch.randn(len(OFFSETS) - 1, k, generator=torch.Generator().manual_seed(1)).to(coeff_dtype)
            out = any_emu.combine_many(grads, offsets, coeffs, _guarded(torch.empty_like(grads[0]), 7.0))
            _assert_guard(out)
            want_c = R.combine_many_by_ids(grads, R.segment_ids(offsets, grads[0].device), coeffs)
            assert bool(((out.double() - want_c).abs() <= _combine_bound(grads, coeffs, want_c, dtype)).all()), k
            inplace = [g.clone() for g in grads]  # into the last buffer: the same bits
            assert torch.equal(any_emu.combine_many(inplace, offsets, coeffs, inplace[-1]), out)
    a, b = _grads(2, dtype=dtype, seed=3)
    coeffs = torch.randn(len(OFFSETS) - 1, 2, generator=torch.Generator().manual_seed(2))
    # K = 2 is the two-objective combine, bit for bit (multi_ops.cu's header)
    assert torch.equal(any_emu.combine_many([a, b], offsets, coeffs, torch.empty_like(a)),
                       any_emu.combine(a, b, offsets, coeffs, torch.empty_like(a)))
    assert bool((any_emu.gram([torch.empty(0)] * 3, torch.tensor([0, 0, 0])) == 0).all())

"""The CPU op's bf16/fp16 statistics keep the stated bound in every build this CPU runs.

bf16 and fp16 lanes sum their exact products in float32 over blocks of at most 8 per lane and add
the block sums in double (csrc/cpu/segment_kernels.h, kStatsBlockSets): every statistic is within
(7 * 2^-24 + (160 + n / 16384) * 2^-53) * sum |products| < 2^-21 * sum |products| of the exact value, inside
rules.STATS_REL_ERR = 2^-20. A bf16 block with an element outside [2^-62, 2^62) (tiny and huge
gradients, NaN, inf), where a product could underflow or a block sum overflow float32, is summed
element by element in double as float32 inputs are: exact to float64 rounding.
"""

import pytest
import torch

import pareto_lora
from pareto_lora import reference
from pareto_lora.rules import STATS_REL_ERR

pytestmark = pytest.mark.skipif("cpp" not in pareto_lora.available_backends("cpu"), reason="extension not built")


def _builds():
    from pareto_lora import _C

    return list(_C.cpu_capabilities())


BUILDS = _builds() if "cpp" in pareto_lora.available_backends("cpu") else []


def _stats(a, b, offsets, build):
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("PARETO_LORA_CPU_CAPABILITY", build)
        return pareto_lora.segment_stats(a, b, offsets, backend="cpp")
    finally:
        mp.undo()


def _exact(a, b, offsets):
    """float64 sums of the exact products, and the sums of |products| (the bound's scale)."""
    a64, b64 = a.double(), b.double()
    return reference.segment_stats(a64, b64, offsets), reference.segment_stats(a64.abs(), b64.abs(), offsets)


def _assert_within(stats, a, b, offsets, rel):
    want, scale = _exact(a, b, offsets)
    err = (stats - want).abs()
    assert bool((err <= rel * scale).all()), f"max relative error {float((err / scale.clamp_min(1e-300)).max()):.3g}"


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_float32_blocks_keep_the_stated_bound(build, dtype):
    gen = torch.Generator().manual_seed(7)
    n = 300_007  # several chunks, a block tail and an element tail
    a = torch.randn(n, generator=gen)
    # anti-parallel plus noise: a.b cancels, so only a bound on sum |a_i b_i| can hold
    b = -a + 0.01 * torch.randn(n, generator=gen)
    a, b = a.to(dtype), b.to(dtype)
    offsets = torch.tensor([0, 5, 1000, 200_000, n])
    stats = _stats(a, b, offsets, build)
    _assert_within(stats, a, b, offsets, 2.0**-21)
    # the float32 blocks are in use (an error far above float64 summation's), so the bound above is
    # what is exercised here
    want, scale = _exact(a, b, offsets)
    assert float(((stats - want).abs() / scale).max()) > 1e-12


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("scale", [1e-23, 1e-30, 1e20, 1e25], ids=["1e-23", "1e-30", "1e20", "1e25"])
def test_tiny_and_huge_bf16_blocks_are_summed_in_double(build, scale):
    gen = torch.Generator().manual_seed(3)
    n = 5_003
    a = (torch.randn(n, generator=gen) * scale).bfloat16()
    b = (torch.randn(n, generator=gen) * scale).bfloat16()
    offsets = torch.tensor([0, 1000, n])
    stats = _stats(a, b, offsets, build)
    assert bool(torch.isfinite(stats).all()) and bool((stats[:, :2] > 0).all())
    _assert_within(stats, a, b, offsets, 1e-12)


@pytest.mark.parametrize("build", BUILDS)
def test_one_out_of_range_element_sends_its_block_to_double(build):
    # a huge element among unit ones: its square (1e40) overflows float32, so its block goes to
    # double and the statistics stay finite and within the bound; a tiny one likewise
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(4096, generator=gen)
    b = torch.randn(4096, generator=gen)
    a[1000], b[3000] = 1e20, 1e-30
    a, b = a.bfloat16(), b.bfloat16()
    offsets = torch.tensor([0, 2048, 4096])
    stats = _stats(a, b, offsets, build)
    assert bool(torch.isfinite(stats).all()) and float(stats[0, 0]) > 9e39
    _assert_within(stats, a, b, offsets, 2.0**-21)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is a test extra; the tests above still run
    given = None

if given is not None:

    @st.composite
    def _problems(draw):
        dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
        sizes = draw(st.lists(st.integers(0, 700), min_size=1, max_size=8))
        # exponents per element from a few bands: blocks mix magnitudes, bf16's reach the edges of
        # float32's range (squares under- and overflowing it) and fp16's its own
        bands = [-30, -20, -3, 0, 3, 18, 22] if dtype == torch.bfloat16 else [-7, -2, 0, 2, 4]
        chosen = draw(st.lists(st.sampled_from(bands), min_size=1, max_size=3, unique=True))
        relation = draw(st.sampled_from(["random", "parallel", "anti_parallel"]))
        return dtype, sizes, chosen, relation, draw(st.integers(0, 2**31 - 1))

    @settings(max_examples=120, deadline=None, derandomize=True)
    @given(problem=_problems())
    def test_random_bf16_fp16_statistics_keep_the_bound_in_every_build(problem):
        dtype, sizes, bands, relation, seed = problem
        gen = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        exps = torch.tensor(bands, dtype=torch.float64)[torch.randint(0, len(bands), (n,), generator=gen)]
        a = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0**exps
        noise = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0**exps
        b = {"random": noise, "parallel": 2 * a + 1e-3 * noise, "anti_parallel": -a + 1e-3 * noise}[relation]
        a, b = a.to(dtype), b.to(dtype)
        offsets = torch.tensor([0] + sizes).cumsum(0)
        bits = None
        for build in BUILDS:
            stats = _stats(a, b, offsets, build)
            assert bool(torch.isfinite(stats).all())
            _assert_within(stats, a, b, offsets, STATS_REL_ERR)
            # and every build gives the same bits (tests/backends/test_cpu_capability.py)
            now = stats.view(torch.int64)
            assert bits is None or torch.equal(bits, now), build
            bits = now

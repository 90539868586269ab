"""The CPU op's builds (portable, AVX2, AVX-512; PARETO_LORA_CPU_CAPABILITY) agree bit for bit.

Every build sums the statistics in the same lane order (csrc/cpu/segment_kernels.h,
kStatsLaneBytes), bf16/fp16 in the same float32 blocks with the same range test (kStatsBlockSets),
so a run keeps its bits when it moves to a machine with another instruction set.
The AVX-512 combine also splits chunks into vector blocks and scalar head/tail at the AVX2
build's positions, so their outputs agree even in NaN payloads. The portable build's combine
rounds alpha*a and beta*b separately (no FMA on a CPU without it): within an ulp, not bitwise.
Builds this CPU cannot run are skipped (they cannot be tested here).
"""

import pytest
import torch

import pareto_lora

pytestmark = pytest.mark.skipif("cpp" not in pareto_lora.available_backends("cpu"), reason="extension not built")

ORDER = ["base", "avx2", "avx512"]


def _supported():
    from pareto_lora import _C

    return list(_C.cpu_capabilities())


SUPPORTED = _supported() if "cpp" in pareto_lora.available_backends("cpu") else []
VECTOR = [c for c in ("avx2", "avx512") if c in SUPPORTED]


def _case(numel, g, dtype, seed, shift=0, special=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(g, generator=gen) + 0.05
    n = numel + shift
    a = torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))
    b = -0.3 * a + torch.randn(n, generator=gen)
    if special:  # NaN and inf at random positions: heads, vector blocks and tails all see some
        idx = torch.randint(0, n, (max(4, n // 50),), generator=gen)
        a[idx[: len(idx) // 2]] = float("nan")
        b[idx[len(idx) // 2:]] = float("inf")
    sizes = (w / w.sum() * numel).long()
    sizes[-1] += numel - int(sizes.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    # a view `shift` elements into the buffer: a, b and out not aligned to 32 or 64 bytes
    return a.to(dtype)[shift:], b.to(dtype)[shift:], offsets


def _run(monkeypatch, capability, fn):
    monkeypatch.setenv("PARETO_LORA_CPU_CAPABILITY", capability)
    return fn()


def _bits(t):
    return t.contiguous().view(torch.uint8)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
IDS = ["fp32", "bf16", "fp16", "fp64"]
# sizes around every block boundary (8/16/32 elements), many segments, and outputs of >= 16 MiB
# (written with streaming stores, with their own aligned head)
SIZES = [(1, 1), (15, 1), (17, 2), (47, 3), (100_003, 7), (1_000_000, 300), (4_500_001, 2)]


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="this CPU runs one build only")
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("numel,g", SIZES)
@pytest.mark.parametrize("shift", [0, 3])
def test_every_build_gives_the_same_bits(monkeypatch, dtype, numel, g, shift):
    a, b, offsets = _case(numel, g, dtype, seed=numel + g + shift, shift=shift)
    results = {c: _run(monkeypatch, c, lambda: pareto_lora.integrate(a, b, offsets, backend="cpp")) for c in SUPPORTED}
    first = results[SUPPORTED[0]]
    for c in SUPPORTED[1:]:
        r = results[c]
        for name in ("stats", "coeffs", "cases"):
            assert torch.equal(_bits(getattr(first, name)), _bits(getattr(r, name))), (c, name)
    for c in VECTOR[1:]:
        assert torch.equal(_bits(results[VECTOR[0]].out), _bits(results[c].out)), c
    if "base" in SUPPORTED and VECTOR:
        # two roundings instead of one: within an ulp of the larger term
        scale = float(first.coeffs.abs().max()) * max(float(a.abs().max()), float(b.abs().max()), 1e-30)
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(results["base"].out.double(), results[VECTOR[-1]].out.double(),
                                   rtol=ulp, atol=2 * ulp * scale)


@pytest.mark.skipif(len(VECTOR) < 2, reason="this CPU runs one vector build only")
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=IDS[:3])
@pytest.mark.parametrize("numel", [33, 1000, 8_500_000])
@pytest.mark.parametrize("shift", [0, 3])
def test_vector_builds_agree_on_nan_and_inf(monkeypatch, dtype, numel, shift):
    a, b, offsets = _case(numel, 2, dtype, seed=numel, shift=shift, special=True)
    coeffs = torch.tensor([[0.7, -1.3], [2.0, 0.5]])

    def stats_and_combine():
        out = torch.empty_like(a)
        pareto_lora.combine(a, b, offsets, coeffs, out=out, backend="cpp")
        return pareto_lora.segment_stats(a, b, offsets, backend="cpp"), out

    (s0, o0), (s1, o1) = (_run(monkeypatch, c, stats_and_combine) for c in VECTOR)
    assert bool(o0.isnan().any())
    # a statistic that meets inf - inf is NaN in both; which NaN (sign, payload) is the compiler's
    # choice of FMA operand order, so NaNs are compared as NaNs there
    torch.testing.assert_close(s0, s1, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(_bits(o0), _bits(o1))


def test_the_build_in_use_is_reported(monkeypatch):
    from pareto_lora import _C

    # the portable build always, then each wider one up to the best; unset, the best one is used
    assert SUPPORTED == ORDER[: len(SUPPORTED)]
    monkeypatch.delenv("PARETO_LORA_CPU_CAPABILITY", raising=False)
    assert _C.cpu_capability() == SUPPORTED[-1]

    for c in SUPPORTED:
        monkeypatch.setenv("PARETO_LORA_CPU_CAPABILITY", c)
        assert _C.cpu_capability() == c


def test_an_unknown_or_unsupported_build_is_a_value_error(monkeypatch):
    from pareto_lora import _C

    a, b, offsets = _case(100, 2, torch.float32, seed=0)
    for bad in ["sse", "AVX2"] + [c for c in ORDER if c not in SUPPORTED]:
        monkeypatch.setenv("PARETO_LORA_CPU_CAPABILITY", bad)
        with pytest.raises(ValueError, match="PARETO_LORA_CPU_CAPABILITY: expected one of 'base'"):
            pareto_lora.integrate(a, b, offsets, backend="cpp")
        with pytest.raises(ValueError, match="PARETO_LORA_CPU_CAPABILITY") as err:
            _C.cpu_capability()
        assert "Exception raised from" not in str(err.value)  # the message, not a C++ backtrace


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is a test extra; the parametrized tests above still run
    given = None

if given is not None:

    @st.composite
    def _layouts(draw):
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        sizes = draw(st.lists(st.integers(0, 200), min_size=1, max_size=12))
        shift = draw(st.integers(0, 31))  # the views' start: every alignment of a, b and out
        scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e15, 1e20]))  # bf16 blocks in float32 and in double
        special = draw(st.booleans())
        return dtype, sizes, shift, scale, special, draw(st.integers(0, 2**31 - 1))

    @pytest.mark.skipif(len(VECTOR) < 2, reason="this CPU runs one vector build only")
    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(layout=_layouts())
    def test_vector_builds_agree_on_random_layouts(layout):
        """Random segment sizes (empty ones included), start alignments, magnitudes and
        specials: the AVX2 and AVX-512 builds give the same bits for statistics and output."""
        dtype, sizes, shift, scale, special, seed = layout
        gen = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        a = torch.randn(n + shift, generator=gen) * scale
        b = torch.randn(n + shift, generator=gen) * scale
        if special and n:
            a[torch.randint(0, n + shift, (3,), generator=gen)] = float("nan")
            b[torch.randint(0, n + shift, (3,), generator=gen)] = float("-inf")
        a, b = a.to(dtype)[shift:], b.to(dtype)[shift:]
        offsets = torch.tensor([0] + sizes).cumsum(0)
        coeffs = torch.rand(len(sizes), 2, generator=gen) * 4 - 2
        results = []
        mp = pytest.MonkeyPatch()
        try:
            for c in VECTOR:
                mp.setenv("PARETO_LORA_CPU_CAPABILITY", c)
                out = torch.empty_like(a)
                pareto_lora.combine(a, b, offsets, coeffs, out=out, backend="cpp")
                results.append((pareto_lora.segment_stats(a, b, offsets, backend="cpp"), out))
        finally:
            mp.undo()
        (s0, o0), (s1, o1) = results
        torch.testing.assert_close(s0, s1, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(_bits(o0), _bits(o1))

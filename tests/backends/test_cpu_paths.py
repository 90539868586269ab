"""The CPU op's one-pass and two-pass paths (PARETO_LORA_CPU_PATH) give bitwise the same results.

Small segments are done in one pass over memory (stats, rule, combine while in L2), large ones in
two (csrc/cpu/segment_kernels.cpp); both sum the same chunk partials in the same order, so the
statistics, coefficients, cases and output must be identical bit for bit, at any thread count.
"""

import pytest
import torch

import pareto_lora

pytestmark = pytest.mark.skipif("cpp" not in pareto_lora.available_backends("cpu"), reason="extension not built")


def _case(numel, g, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(g, generator=gen) + 0.05
    sizes = (w / w.sum() * numel).long()
    sizes[-1] += numel - int(sizes.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    # spread over many binades, with sign conflicts: every rule branch, rounding in every lane
    a = torch.randn(numel, generator=gen) * torch.exp(2 * torch.randn(numel, generator=gen))
    b = -0.3 * a + torch.randn(numel, generator=gen)
    return a.to(dtype), b.to(dtype), offsets


def _run(monkeypatch, path, threads, a, b, offsets, rule):
    monkeypatch.setenv("PARETO_LORA_CPU_PATH", path)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        r = pareto_lora.integrate(a, b, offsets, rule=rule, backend="cpp")
    finally:
        torch.set_num_threads(old)
    return r


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("numel,g", [(1000, 1), (100_003, 7), (700_001, 64), (1_000_000, 300), (3_000_000, 2)])
@pytest.mark.parametrize("rule", ["pareto_lora", "mmpareto"])
def test_one_pass_equals_two_pass_bitwise(monkeypatch, dtype, numel, g, rule):
    a, b, offsets = _case(numel, g, dtype, seed=numel + g)
    results = [_run(monkeypatch, path, threads, a, b, offsets, rule)
               for path in ("two_pass", "one_pass", "auto") for threads in (1, 2)]
    first = results[0]
    for r in results[1:]:
        for x, y in zip((first.out, first.stats, first.coeffs, first.cases), (r.out, r.stats, r.coeffs, r.cases)):
            assert torch.equal(_bits(x), _bits(y))


def test_one_pass_matches_the_reference(monkeypatch):
    a, b, offsets = _case(200_000, 50, torch.float32, seed=3)
    r = _run(monkeypatch, "one_pass", 2, a, b, offsets, "pareto_lora")
    ref = pareto_lora.reference.integrate(a, b, offsets)
    torch.testing.assert_close(r.stats, ref.stats, rtol=1e-12, atol=0)
    # float32 combine vs the oracle's float64 one: a few ulps of the largest term alpha*a, beta*b
    scale = float(r.coeffs.abs().max()) * max(float(a.abs().max()), float(b.abs().max()))
    torch.testing.assert_close(r.out, ref.out, rtol=1e-6, atol=1e-6 * scale)
    assert torch.equal(r.cases, ref.cases)


def test_unknown_path_is_a_value_error(monkeypatch):
    a, b, offsets = _case(100, 2, torch.float32, seed=0)
    monkeypatch.setenv("PARETO_LORA_CPU_PATH", "three_pass")
    with pytest.raises(ValueError, match="PARETO_LORA_CPU_PATH"):
        pareto_lora.integrate(a, b, offsets, backend="cpp")


def _with_empty_segments(a, b, offsets, every=3):
    """The same buffers with an empty segment inserted before every `every`-th segment."""
    bounds = offsets.tolist()
    new = [0]
    for i in range(1, len(bounds)):
        if i % every == 0:
            new.append(new[-1])
        new.append(bounds[i])
    return a, b, torch.tensor(new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("numel,g,cuts", [(100_003, 7, [1, 4, 4]), (1_000_000, 300, [1, 100, 299]), (3_000_000, 2, [])])
def test_grouped_paths_and_threads_are_bitwise_equal(monkeypatch, dtype, numel, g, cuts):
    # One-pass segments (groups of one) next to multi-segment groups, empty segments and an empty
    # group: every path and thread count gives the same bits, and the group statistics are the
    # segments' rows summed left to right from +0.0.
    a, b, offsets = _with_empty_segments(*_case(numel, g, dtype, seed=numel + g))
    s = offsets.numel() - 1
    groups = torch.tensor([0, *cuts, s])
    results = []
    for path in ("two_pass", "one_pass", "auto"):
        for threads in (1, 2):
            monkeypatch.setenv("PARETO_LORA_CPU_PATH", path)
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                results.append(pareto_lora.integrate(a, b, offsets, rule="pareto_lora", groups=groups, backend="cpp"))
            finally:
                torch.set_num_threads(old)
    first = results[0]
    assert torch.equal(_bits(first.group_stats), _bits(pareto_lora.reference.group_sums(first.stats, groups)))
    for r in results[1:]:
        for x, y in zip((first.out, first.stats, first.group_stats, first.coeffs, first.cases),
                        (r.out, r.stats, r.group_stats, r.coeffs, r.cases)):
            assert torch.equal(_bits(x), _bits(y))


def test_empty_segments_get_their_rule_on_the_two_pass_path(monkeypatch):
    # Found while adding groups: with PARETO_LORA_CPU_PATH=two_pass an empty segment has no chunks,
    # and its rule never ran (its coefficients and case were left unwritten).
    a, b, offsets = _with_empty_segments(*_case(50_000, 4, torch.float32, seed=1), every=2)
    want = pareto_lora.reference.integrate(a, b, offsets)
    r = _run(monkeypatch, "two_pass", 1, a, b, offsets, "pareto_lora")
    assert torch.equal(r.cases, want.cases) and torch.equal(r.coeffs, want.coeffs)

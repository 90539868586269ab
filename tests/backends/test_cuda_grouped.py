"""The grouped training step (groups / poison / given stats) on the CUDA backend: statistics against
the CPU op and the reference, poison read on the device inside a replayed CUDA graph. Skipped without
a CUDA device (test_cuda.py fails, not skips, a GPU machine whose build lacks the CUDA kernels).
"""

from __future__ import annotations

import pytest
import torch

import pareto_lora
from pareto_lora import Case
from pareto_lora import reference as ref
from _cuda_inputs import make_pair, offsets_from_sizes, random_sizes

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def integrate(*args, **kw):
    return pareto_lora.integrate(*args, backend="cpp", **kw)


# ---- the grouped training step (groups / poison / given stats) -------------------------------------
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_step_matches_the_cpu_op_bitwise_in_its_statistics(dtype):
    # Per-segment statistics may differ from the CPU op's in the last bits (tiles vs chunks), but
    # the group sums of the GPU's own rows follow reference.group_sums exactly.
    sizes = random_sizes(200, 50_000, seed=31)
    offsets = offsets_from_sizes(sizes)
    groups = torch.tensor([0, 1, 50, 50, 199, 200])
    a, b = make_pair(offsets, dtype, seed=31)
    res = integrate(a, b, offsets, rule="pareto_lora", groups=groups)
    assert torch.equal(res.group_stats.cpu(), ref.group_sums(res.stats.cpu(), groups))
    want = pareto_lora.integrate(a.double().cpu(), b.double().cpu(), offsets[groups], rule="pareto_lora", backend="reference")
    torch.testing.assert_close(res.group_stats.cpu(), want.stats, rtol=2.0**-20, atol=0)
    assert torch.equal(res.cases.cpu(), want.cases)


@gpu
def test_grouped_step_with_poison_replays_in_a_cuda_graph():
    # poison is read on the device: one captured graph, replayed with it false then true.
    offsets = offsets_from_sizes([4096, 100, 0, 70_000, 5])
    groups = torch.tensor([0, 2, 5])
    a, b = make_pair(offsets, torch.float32, seed=32)
    poison = torch.zeros((), dtype=torch.bool, device="cuda")
    out = torch.empty_like(a)
    integrate(a, b, offsets, out=out, groups=groups, poison=poison)  # warm-up: workspace, caches
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = integrate(a, b, offsets, out=out, groups=groups, poison=poison)
    graph.replay()
    clean = ref.integrate(a.cpu(), b.cpu(), offsets, groups=groups)
    torch.testing.assert_close(out.cpu(), clean.out, rtol=1e-5, atol=1e-5)
    poison.fill_(True)
    graph.replay()
    assert bool(out.isnan().all()) and bool((res.cases == int(Case.NONFINITE)).all())

"""CPU: the fused C++ op vs the float64 reference, a float32 vectorised torch version and a
per-segment Python loop. N = 16M elements, G = 64 segments, fp32 and bf16.

    python -m pytest bench/bench_ops_cpu.py --benchmark-only -q
"""

import pytest
import torch

import pareto_lora
from baselines import per_segment_loop, vectorized_fp32
from conftest import copy_bandwidth

N, G = 16 * 2**20, 64


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(N, generator=gen).to(dtype)
    b = (-0.3 * a.float() + 0.2 * torch.randn(N, generator=gen)).to(dtype)
    cuts = torch.linspace(0, N, G + 1).long()
    return a, b, cuts


IMPLS = {
    "cpp_fused": lambda a, b, o, out: pareto_lora.integrate(a, b, o, out=out, backend="cpp"),
    "reference_f64": lambda a, b, o, out: pareto_lora.reference.integrate(a, b, o, out=out),
    "torch_vectorized_f32": vectorized_fp32,
    "per_segment_loop": per_segment_loop,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_integrate_cpu(benchmark, impl, dtype):
    a, b, offsets = _inputs(dtype)
    out = torch.empty_like(a)
    copy_bandwidth("cpu")
    benchmark.extra_info.update(group=f"cpu N=16M G=64 {str(dtype)[6:]}", impl=impl, bytes=3 * N * a.element_size())
    benchmark.pedantic(IMPLS[impl], args=(a, b, offsets, out), rounds=5, iterations=1, warmup_rounds=1)

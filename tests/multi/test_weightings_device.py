"""The K-objective weightings on a CUDA device (bench/run_on_device.sh runs this file): the same
weights as on the CPU, and no host synchronisation (torch.cuda.set_sync_debug_mode("error") turns
one into an error). Without a CUDA device there is nothing to run: the CPU suites cover the rules."""

import pytest
import torch

from pareto_lora import RuleSpec
from pareto_lora.multi.weightings import K_RULES, apply

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _grams(k, groups=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(groups, k, 12, generator=g, dtype=torch.float64)
    j = j * 10.0 ** (4 * torch.rand(groups, k, 1, generator=g, dtype=torch.float64) - 2)
    return j @ j.transpose(-1, -2)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("name", K_RULES)
def test_cuda_weights_equal_cpu_and_never_sync(name, k):
    spec = RuleSpec(name, weights=tuple(float(i + 1) for i in range(k))) if name == "constant" else RuleSpec(name)
    gram = _grams(k)
    want_w, want_c = apply(spec, gram, dtype=torch.float64)
    dev = gram.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got_w, got_c = apply(spec, dev, dtype=torch.float64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got_c.cpu(), want_c)
    # float64 on both; the device's fused multiply-adds and reductions may round differently
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-9, atol=1e-12)

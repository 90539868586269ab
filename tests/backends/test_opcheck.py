"""torch.library.opcheck for every compiled op (schema, fake kernel, autograd registration)."""

import pytest
import torch

import pareto_lora  # noqa: F401


def _args(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, generator=gen).to(device)
    b = torch.randn(300, generator=gen).to(device)
    offsets = torch.tensor([0, 100, 100, 300])
    return a, b, offsets


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_all_ops(device):
    a, b, offsets = _args(device)
    ops = torch.ops.pareto_lora
    stats = ops.segment_stats(a, b, offsets)
    torch.library.opcheck(ops.segment_stats, (a, b, offsets))
    torch.library.opcheck(ops.rule_coefficients, (stats, "pareto_lora", 0.5, None, 1.0, False))
    active = torch.tensor([True, False, True], device=device)
    torch.library.opcheck(ops.rule_coefficients, (stats, "mmpareto", 0.5, active, 1.5, True))
    coeffs = torch.rand(3, 2, device=device)
    torch.library.opcheck(ops.combine, (a, b, offsets, coeffs, torch.empty_like(a)))
    torch.library.opcheck(ops.integrate, (a, b, offsets, torch.empty_like(a), "pareto_lora", 0.5, None, 1.0, False))


def test_integrate_under_torch_compile():
    a, b, offsets = _args()

    def step(a, b, offsets):
        out = torch.empty_like(a)
        stats, coeffs, cases = torch.ops.pareto_lora.integrate(a, b, offsets, out, "pareto_lora", 0.5, None, 1.0, False)
        return out * 2, coeffs, cases

    eager = step(a, b, offsets)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(a, b, offsets)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y)

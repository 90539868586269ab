"""torch.library.opcheck for every compiled op (schema, fake kernel, autograd registration)."""

import pytest
import torch

import pareto_lora


def P(**fields):
    """A RuleSpec's parameters as the compiled ops take them (rules.KERNEL_PARAMS)."""
    return list(pareto_lora.RuleSpec(**fields).kernel_params())


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
    torch.library.opcheck(ops.rule_coefficients, (stats, "pareto_lora", P(), None))
    active = torch.tensor([True, False, True], device=device)
    torch.library.opcheck(ops.rule_coefficients, (stats, "mmpareto", P(gamma=1.5, symmetric=True), active))
    coeffs = torch.rand(3, 2, device=device)
    torch.library.opcheck(ops.combine, (a, b, offsets, coeffs, torch.empty_like(a)))
    torch.library.opcheck(ops.integrate, (a, b, offsets, torch.empty_like(a), "pareto_lora", P(), None))
    # the training-step arguments: groups (on the CPU and on a's device), poison, given stats
    groups = torch.tensor([0, 2, 3])
    for g in (groups, groups.to(device)):
        for poison in (None, torch.tensor(False, device=device), torch.tensor(True, device=device)):
            torch.library.opcheck(
                ops.integrate,
                (a, b, offsets, torch.empty_like(a), "pareto_lora", P(), torch.tensor([True, False], device=device),
                 g, poison, None))
    torch.library.opcheck(
        ops.integrate, (a, b, offsets, torch.empty_like(a), "mmpareto", P(gamma=1.5, symmetric=True, margin=0.1), None, groups, None, stats))
    torch.library.opcheck(ops.integrate, (a, b, offsets, torch.empty_like(a), "sum", P(), None,
                                          None, None, stats))


def test_integrate_under_torch_compile():
    a, b, offsets = _args()

    def step(a, b, offsets):
        out = torch.empty_like(a)
        stats, _, coeffs, cases = torch.ops.pareto_lora.integrate(a, b, offsets, out, "pareto_lora", P(), None)
        return out * 2, coeffs, cases

    eager = step(a, b, offsets)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(a, b, offsets)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y)


def test_grouped_integrate_under_torch_compile():
    a, b, offsets = _args()
    groups = torch.tensor([0, 2, 3])

    def step(a, b, offsets, groups, poison, given):
        out = torch.empty_like(a)
        stats, group_stats, coeffs, cases = torch.ops.pareto_lora.integrate(
            a, b, offsets, out, "pareto_lora", P(), None, groups, poison, given)
        return out * 2, stats, group_stats, coeffs, cases

    given = torch.ops.pareto_lora.segment_stats(a, b, offsets) * 2
    for poison, st in ((torch.tensor(False), None), (torch.tensor(True), given)):
        eager = step(a, b, offsets, groups, poison, st)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(a, b, offsets, groups, poison, st)
        for x, y in zip(eager, compiled):
            torch.testing.assert_close(x, y, equal_nan=True)

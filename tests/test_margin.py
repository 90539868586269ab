"""The conflict margin (RuleSpec.margin): cos < -margin instead of cos < 0, on every backend.

Oracle in float64 written from the definition; margin = 0 must be today's behaviour bitwise.
"""

import math

import pytest
import torch

import pareto_lora
from pareto_lora import RuleSpec
from pareto_lora.rules import Case, as_spec

CONFLICT_RULES = ("pareto_lora", "pareto_only", "mmpareto")


def _stats(n=400, seed=0):
    """[n, 3] valid stats with cosines spread over [-1, 1] and ratios over 1e-3 .. 1e3."""
    g = torch.Generator().manual_seed(seed)
    na = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3)
    nb = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3)
    cos = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    cos[:8] = torch.tensor([0.0, -0.0, -0.05, -0.1, -0.1000001, -0.0999999, 0.05, -1.0], dtype=torch.float64)
    return torch.stack([na * na, nb * nb, cos * na * nb], 1)


def _oracle_pareto_lora(stats, tau, margin):
    """(alpha, beta, case) per row from the definition (float64, Python floats)."""
    out = []
    for aa, bb, ab in stats.tolist():
        na, nb = math.sqrt(aa), math.sqrt(bb)
        if ab / (na * nb) < -margin:
            d2 = aa + bb - 2 * ab
            lam = min(max((bb - ab) / d2, 0.0), 1.0) if d2 > 0 else 0.5
            out.append((lam, 1 - lam, Case.PARETO))
        elif na > tau * nb:
            out.append((nb / na if na < nb else 1.0, na / nb if nb < na else 1.0, Case.RESCALED))
        else:
            out.append((1.0, 1.0, Case.SUMMED))
    return out


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5])
def test_pareto_lora_margin_matches_the_oracle(any_backend, margin):
    be, dev = any_backend
    stats = _stats()
    # rows whose cosine sits within rounding of -margin could go either way: leave them out
    cos = stats[:, 2] / (stats[:, 0].sqrt() * stats[:, 1].sqrt())
    keep = (cos + margin).abs() > 1e-9
    stats = stats[keep]
    coeffs, cases = pareto_lora.rule_coefficients(stats.to(dev), RuleSpec("pareto_lora", margin=margin), backend=be)
    want = _oracle_pareto_lora(stats, 0.5, margin)
    assert cases.cpu().tolist() == [int(c) for _, _, c in want]
    expected = torch.tensor([(a, b) for a, b, _ in want], dtype=torch.float32)
    torch.testing.assert_close(coeffs.cpu(), expected, rtol=1e-6, atol=0)


def test_margin_turns_weak_conflicts_into_the_other_branches():
    # cos -0.05 with the image dominant (summed), cos -0.5, cos -0.005 with the text dominant (rescaled)
    stats = torch.tensor([[1.0, 100.0, -0.5], [1.0, 1.0, -0.5], [100.0, 1.0, -0.05]], dtype=torch.float64)
    _, c0 = pareto_lora.rule_coefficients(stats, "pareto_lora", backend="reference")
    _, c1 = pareto_lora.rule_coefficients(stats, "pareto_lora", margin=0.1, backend="reference")
    assert c0.tolist() == [int(Case.PARETO)] * 3
    assert c1.tolist() == [int(Case.SUMMED), int(Case.PARETO), int(Case.RESCALED)]


@pytest.mark.parametrize("rule", pareto_lora.RULES)
def test_margin_zero_is_todays_behaviour_bitwise(any_backend, rule):
    be, dev = any_backend
    stats = _stats(seed=1).to(dev)
    a, ca = pareto_lora.rule_coefficients(stats, rule, backend=be)
    b, cb = pareto_lora.rule_coefficients(stats, RuleSpec(rule, margin=0.0), backend=be)
    assert torch.equal(a, b) and torch.equal(ca, cb)
    x = torch.randn(3000, generator=torch.Generator().manual_seed(2), dtype=torch.float32).to(dev)
    y = torch.randn(3000, generator=torch.Generator().manual_seed(3), dtype=torch.float32).to(dev)
    off = torch.tensor([0, 1000, 2000, 3000], device=dev)
    r0 = pareto_lora.integrate(x, y, off, rule=rule, backend=be)
    r1 = pareto_lora.integrate(x, y, off, rule=rule, margin=0.0, backend=be)
    assert torch.equal(r0.out, r1.out) and torch.equal(r0.coeffs, r1.coeffs)


@pytest.mark.parametrize("rule", CONFLICT_RULES)
def test_backends_agree_with_the_reference_under_a_margin(backend, rule):
    be, dev = backend
    stats = _stats(seed=4)
    spec = RuleSpec(rule, margin=0.2)
    want, wcases = pareto_lora.rule_coefficients(stats, spec, backend="reference")
    got, gcases = pareto_lora.rule_coefficients(stats.to(dev), spec, backend=be)
    assert torch.equal(gcases.cpu(), wcases)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0)
    x = torch.randn(3000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = -0.15 * x + torch.randn(3000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    off = torch.tensor([0, 1000, 2000, 3000])
    r = pareto_lora.integrate(x.to(dev), y.to(dev), off.to(dev), rule=spec, backend=be)
    w = pareto_lora.integrate(x, y, off, rule=spec, backend="reference")
    assert torch.equal(r.cases.cpu(), w.cases)
    # the kernels store (alpha, beta) in float32, the float64 reference keeps them in float64
    torch.testing.assert_close(r.out.cpu(), w.out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, True, "0.1"])
def test_bad_margin_names_the_argument(bad):
    with pytest.raises(ValueError, match="margin"):
        RuleSpec("pareto_lora", margin=bad)
    with pytest.raises(ValueError, match="margin"):
        as_spec(RuleSpec("pareto_lora"), margin=0.1)  # a spec carries its own margin


def test_compiled_op_checks_margin_itself():
    stats = _stats(8)
    with pytest.raises((ValueError, RuntimeError), match="margin"):
        torch.ops.pareto_lora.rule_coefficients(stats, "pareto_lora", [0.5, 1.0, 0.0, 2.0, 0.4, 1.0, 1.0, 1.0, 1e-4])
    c0 = torch.ops.pareto_lora.rule_coefficients(stats, "pareto_lora", list(RuleSpec().kernel_params()))
    c1 = pareto_lora.rule_coefficients(stats, "pareto_lora", margin=0.0, backend="cpp")
    assert all(torch.equal(p, q) for p, q in zip(c0, c1))

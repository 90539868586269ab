"""Shared by tests/test_family_b.py and tests/test_family_b_guarantees.py: the four rules of the second
batch of the family (cagrad, nash_mtl, aligned_mtl, config), pairs of given norms and angle, and torchjd's
aggregator at our defaults."""

import math
import warnings

import torch
from torchjd.aggregation import AlignedMTL, CAGrad, ConFIG, NashMTL

import pareto_lora

RULES_B = ("cagrad", "nash_mtl", "aligned_mtl", "config")
N = 24  # entries per gradient: enough for any angle, small enough for cvxpy


def pair(na, nb, cos, seed=0, n=N):
    """float64 a, b with ||a|| = na, ||b|| = nb and cos(a, b) = cos (exactly up to rounding)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    x = x / x.norm()
    y = y - (y @ x) * x
    y = y / y.norm()
    return na * x, nb * (cos * x + math.sqrt(max(1.0 - cos * cos, 0.0)) * y)


def ours(a, b, rule, backend="reference", **kw):
    """(out, (alpha, beta), case) of one segment; float64 inputs keep float64 coefficients."""
    res = pareto_lora.integrate(a, b, torch.tensor([0, a.numel()]), rule=rule, backend=backend, **kw)
    return res.out, res.coeffs[0], int(res.cases[0])


def aggregator(rule):
    """torchjd's aggregator of a rule at our defaults (a fresh one: NashMTL is stateful)."""
    return {"cagrad": CAGrad(c=0.4), "nash_mtl": NashMTL(n_tasks=2), "aligned_mtl": AlignedMTL(), "config": ConFIG()}[rule]


def aggregate(agg, a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's solver chatter
        return agg(torch.stack([a, b]))

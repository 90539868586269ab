"""Shared property asserts (torchjd style): each takes an `integrate(a, b) -> out` callable on one
segment and checks one property of the rule on fresh inputs."""

import torch


def assert_min_norm(integrate, a, b, tol=1e-6):
    """out has the least norm among convex combinations lambda*a + (1-lambda)*b (fine grid)."""
    out = integrate(a, b).double()
    lam = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]
    grid = (lam * a.double() + (1 - lam) * b.double()).norm(dim=1)
    assert float(out.norm()) <= float(grid.min()) * (1 + tol) + tol


def assert_non_conflicting(integrate, a, b, tol=1e-6):
    """out does not increase either objective to first order: out.a >= 0 and out.b >= 0."""
    out = integrate(a, b).double()
    scale = float(out.norm() * (a.double().norm() + b.double().norm())) + 1e-30
    assert float(out @ a.double()) >= -tol * scale
    assert float(out @ b.double()) >= -tol * scale


def assert_positively_homogeneous(integrate, a, b, ks=(0.5, 3.0, 1e3), rtol=1e-5):
    """integrate(k a, k b) == k integrate(a, b) for k > 0."""
    base = integrate(a, b).double()
    for k in ks:
        torch.testing.assert_close(integrate(k * a, k * b).double(), k * base, rtol=rtol, atol=rtol * k * float(base.abs().max()))


def assert_swap_symmetric(integrate, a, b, rtol=1e-5):
    """integrate(a, b) == integrate(b, a)."""
    x, y = integrate(a, b).double(), integrate(b, a).double()
    torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(x.abs().max()))

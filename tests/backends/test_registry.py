"""The backend registry: one table resolves every name, and every backend has the same surface."""

import inspect

import pytest
import torch

import pareto_lora
from pareto_lora.backends import BACKENDS, available_backends, resolve_backend
from pareto_lora.backends.protocol import Backend
from pareto_lora.result import IntegrationResult

FUNCTIONS = ("segment_stats", "rule_coefficients", "combine", "integrate", "gram", "combine_many", "is_available")


def test_available_backends_are_resolvable_modules_with_the_op_surface():
    for name in available_backends("cpu"):
        module = resolve_backend(name, torch.device("cpu"))
        for fn in FUNCTIONS:
            assert callable(getattr(module, fn)), (name, fn)
        assert module.is_available("cpu")


def _protocol_params(fn_name):
    """The Backend protocol's parameters of `fn_name` (without self): kind and name."""
    sig = inspect.signature(getattr(Backend, fn_name))
    return [p for p in sig.parameters.values() if p.name != "self"]


def test_every_backend_implements_the_protocol():
    # Positional parameters by position, keyword-only ones
    # by name: a call written against the protocol runs on every backend.
    for name in available_backends("cpu"):
        module = resolve_backend(name, torch.device("cpu"))
        assert isinstance(module, Backend), name
        for fn in FUNCTIONS:
            have = inspect.signature(getattr(module, fn)).parameters
            positional = [p for p in have.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            for i, p in enumerate(_protocol_params(fn)):
                if p.kind == p.KEYWORD_ONLY:
                    assert p.name in have and have[p.name].default is None, (name, fn, p.name)
                else:
                    assert i < len(positional), (name, fn, p.name)
                    assert (p.default is p.empty) == (positional[i].default is positional[i].empty), (name, fn, p.name)


def test_backends_below_the_boundary_take_only_the_spec():
    # The loose rule keywords are accepted by the public functions only (ops.py, sharded_integrate);
    # the float64 oracle is a backend like the others.
    for name in ("cpp", "triton", "reference"):
        if name not in available_backends("cpu"):
            continue
        module = resolve_backend(name, torch.device("cpu"))
        for fn in ("rule_coefficients", "integrate"):
            params = inspect.signature(getattr(module, fn)).parameters
            assert "spec" in params and not {"rule", "tau", "gamma", "symmetric", "margin"} & set(params), (name, fn)


def test_every_backend_returns_the_same_types(any_backend):
    name, device = any_backend
    module = resolve_backend(name, torch.device(device))
    a = torch.randn(50, device=device)
    b = torch.randn(50, device=device)
    offsets = torch.tensor([0, 20, 50])
    res = module.integrate(a, b, offsets)
    assert isinstance(res, IntegrationResult) and res.out.shape == a.shape
    coeffs, cases = module.rule_coefficients(res.stats)
    assert torch.equal(cases, res.cases)
    out = module.combine(a, b, offsets, coeffs)
    torch.testing.assert_close(out, res.out)


def test_unknown_backend_and_auto():
    with pytest.raises(ValueError, match=r"^backend: unknown backend 'cuda'; expected one of auto"):
        resolve_backend("cuda", torch.device("cpu"))
    assert BACKENDS[0] == "auto"
    assert resolve_backend("auto", torch.device("cpu")) is resolve_backend("cpp", torch.device("cpu"))
    assert resolve_backend("reference", torch.device("cpu")) is pareto_lora.reference


def test_the_torch_ops_exist_right_after_import():
    # A fresh interpreter: no backend resolved yet (found on a GPU machine, where a script calling
    # torch.ops.pareto_lora.integrate after `import pareto_lora` got "no attribute 'integrate'").
    import subprocess
    import sys

    code = "import torch, pareto_lora; print(all(hasattr(torch.ops.pareto_lora, n) for n in " \
           "('segment_stats', 'rule_coefficients', 'combine', 'integrate')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"

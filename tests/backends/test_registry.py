"""The backend registry: one table resolves every name, and every backend has the same surface."""

import inspect

import pytest
import torch

import pareto_lora
from pareto_lora.backends import BACKENDS, available_backends, resolve_backend
from pareto_lora.result import IntegrationResult

FUNCTIONS = ("segment_stats", "rule_coefficients", "combine", "integrate", "is_available")


def test_available_backends_are_resolvable_modules_with_the_op_surface():
    for name in available_backends("cpu"):
        module = resolve_backend(name, torch.device("cpu"))
        for fn in FUNCTIONS:
            assert callable(getattr(module, fn)), (name, fn)
        assert module.is_available("cpu")


def test_same_signatures_on_every_backend():
    names = available_backends("cpu")
    sigs = {n: {f: list(inspect.signature(getattr(resolve_backend(n, torch.device("cpu")), f)).parameters)
                for f in FUNCTIONS[:-1]} for n in names}
    first = sigs[names[0]]
    for n in names[1:]:
        assert sigs[n] == first, n


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

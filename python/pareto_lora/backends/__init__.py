"""The backend registry: ``backend="auto" | "cpp" | "triton" | "reference"`` resolves here, once.

Every backend is a module implementing :class:`~pareto_lora.backends.protocol.Backend`
(``segment_stats``, ``rule_coefficients``, ``combine``, ``integrate`` -> IntegrationResult, and
an ``is_available(device_type)`` probe; the rule arrives as one RuleSpec); there are no adapter
objects. The compiled backend loads
with the package (it registers the torch ops); Triton's module is imported only when it is asked
for, so a missing triton costs nothing until it is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# The compiled backend is always installed: load it with the package, so that
# torch.ops.pareto_lora.* and their fake kernels exist right after `import pareto_lora`.
from . import cpp as _cpp  # noqa: F401

__all__ = ["BACKENDS", "available_backends", "resolve_backend"]

# name -> module implementing it, in the order available_backends() lists them.
_MODULES = {
    "cpp": "pareto_lora.backends.cpp",
    "reference": "pareto_lora.reference",
    "triton": "pareto_lora.backends.triton.ops",
}
BACKENDS = ("auto", *_MODULES)


_LOADED: dict[str, ModuleType] = {}


def _load(name: str) -> ModuleType:
    # Cached: every op call resolves its backend, and import_module takes the import lock each time.
    module = _LOADED.get(name)
    if module is not None:
        return module
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as e:  # e.g. triton missing, or not importable here
        raise RuntimeError(f"backend={name!r} is not available: {e}") from e
    _LOADED[name] = module
    return module


def _usable(name: str, device_type: str) -> bool:
    try:
        return _load(name).is_available(device_type)
    except RuntimeError:
        return False


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on tensors of `device`."""
    dev = torch.device(device).type
    return [name for name in _MODULES if _usable(name, dev)]


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The module of `backend` for tensors on `device` ("auto": cpp if it has a kernel there, else triton)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "cpp" if _usable("cpp", device.type) else "triton"
    module = _load(backend)
    if backend == "cpp" and not module.is_available(device.type):
        raise RuntimeError(f"backend='cpp': the compiled extension has no kernel for device {device.type!r}")
    return module

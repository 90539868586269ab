"""Shared fixtures: which (backend, device) pairs exist here, and input builders.

Without a GPU, Triton runs in its interpreter on CPU tensors; TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before pareto_lora is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pareto_lora  # noqa: E402


def _kernel_backends():
    pairs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for be in pareto_lora.available_backends(dev):
            if be != "reference":
                pairs.append(pytest.param((be, dev), id=f"{be}-{dev}"))
    return pairs


KERNEL_BACKENDS = _kernel_backends()


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """(backend name, device) for every compiled/Triton kernel available on this machine."""
    return request.param


@pytest.fixture(params=[pytest.param(("reference", "cpu"), id="reference-cpu"), *KERNEL_BACKENDS])
def any_backend(request):
    """Like `backend`, plus the pure-torch reference (for checks every implementation must pass)."""
    return request.param

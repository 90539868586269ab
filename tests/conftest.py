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


def random_offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def random_sizes(num_segments, mean, gen, empty_every=0):
    """Segment sizes around `mean` (odd ones included); every `empty_every`-th segment is empty."""
    sizes = torch.randint(1, 2 * mean + 2, (num_segments,), generator=gen).tolist()
    if empty_every:
        for i in range(0, num_segments, empty_every):
            sizes[i] = 0
    return sizes


def make_pair(numel, dtype, device, gen, corr=-0.2, scale_b=0.3):
    """Two random gradients with some correlation (sign of `corr`) and unequal norms."""
    a = torch.randn(numel, generator=gen, dtype=torch.float64)
    b = scale_b * (corr * a + torch.randn(numel, generator=gen, dtype=torch.float64))
    return a.to(dtype).to(device), b.to(dtype).to(device)

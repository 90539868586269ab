"""Inputs of the CUDA tests (test_cuda.py, test_cuda_grouped.py): offsets from sizes, LoRA-like
random segment sizes, and gradient pairs made on the device with every rule case in them."""

from __future__ import annotations

import math

import torch

from pareto_lora import reference as ref


def offsets_from_sizes(sizes) -> torch.Tensor:
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.as_tensor(sizes, dtype=torch.int64), 0)
    return off


def random_sizes(g: int, max_len: int, seed: int) -> list[int]:
    """Log-uniform sizes with some 0s and 1s mixed in."""
    gen = torch.Generator().manual_seed(seed)
    logs = torch.rand(g, generator=gen, dtype=torch.float64) * math.log(max_len + 1)
    sizes = (logs.exp() - 1).long().tolist()
    for i in range(0, g, 17):
        sizes[i] = 0
    for i in range(5, g, 19):
        sizes[i] = 1
    return sizes


def make_pair(offsets: torch.Tensor, dtype, seed=0, device="cuda"):
    """a, b with per-segment scale and correlation, so every rule case shows up."""
    g = offsets.numel() - 1
    n = int(offsets[-1])
    gen = torch.Generator(device=device).manual_seed(seed)
    seg = ref.segment_ids(offsets, torch.device(device))
    scale_a = torch.exp(torch.randn(g, generator=gen, device=device) * 1.5)
    scale_b = torch.exp(torch.randn(g, generator=gen, device=device) * 1.5)
    corr = torch.rand(g, generator=gen, device=device) * 4 - 2
    a = torch.randn(n, generator=gen, device=device) * scale_a[seg]
    b = corr[seg] * a + torch.randn(n, generator=gen, device=device) * scale_b[seg]
    return a.to(dtype), b.to(dtype)

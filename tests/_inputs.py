"""Input builders shared by the op tests (segment layouts, correlated gradient pairs)."""

import torch


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

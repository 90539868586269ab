"""The layout of K-objective statistics: which dot product sits in which column, once.

csrc (multi kernels) and Triton derive the same order: column p of a statistics row holds
``g_i . g_j`` for ``(i, j) = pairs(K)[p]``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["MAX_OBJECTIVES", "num_pairs", "pairs", "gram_matrix", "upper_triangle"]

from ..rules import MAX_OBJECTIVES  # defined once, beside the rule table (RuleSpec.weights uses it)


def num_pairs(k: int) -> int:
    """K (K + 1) / 2: the number of statistics per segment."""
    return k * (k + 1) // 2


@functools.lru_cache(maxsize=None)
def pairs(k: int) -> tuple[tuple[int, int], ...]:
    """The (i, j), i <= j, of each statistics column: the row-major upper triangle of a K x K matrix."""
    return tuple((i, j) for i in range(k) for j in range(i, k))


def gram_matrix(stats: torch.Tensor, k: int) -> torch.Tensor:
    """[..., K(K+1)/2] statistics rows -> [..., K, K] symmetric Gram matrices (same dtype and device)."""
    if stats.shape[-1] != num_pairs(k):
        raise ValueError(f"stats: expected a last dimension of K(K+1)/2 = {num_pairs(k)} for K = {k}, "
                         f"got shape {tuple(stats.shape)}")
    rows, cols = zip(*pairs(k))
    out = stats.new_zeros((*stats.shape[:-1], k, k))
    out[..., list(rows), list(cols)] = stats
    out[..., list(cols), list(rows)] = stats
    return out


def upper_triangle(gram: torch.Tensor) -> torch.Tensor:
    """[..., K, K] -> [..., K(K+1)/2]: the inverse of :func:`gram_matrix` (reads the upper triangle)."""
    k = gram.shape[-1]
    rows, cols = zip(*pairs(k))
    return gram[..., list(rows), list(cols)]

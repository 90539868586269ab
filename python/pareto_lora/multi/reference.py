"""The float64 oracle of the K-objective kernels: the Gram statistics and the combine.

Every backend's ``gram`` and ``combine_many`` is tested against these. Products of two float32
(or narrower) values are exact in float64, so the statistics differ from the exact sums only by
the float64 additions (relative error ~ n 2^-53, far inside rules.STATS_REL_ERR).
"""

from __future__ import annotations

import torch

from .. import checks as _checks
from .checks import check_combine_many, check_grads
from .gram import num_pairs, pairs

__all__ = ["gram", "combine_many", "segment_ids", "gram_by_ids", "combine_many_by_ids"]


def segment_ids(offsets: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Segment index of every element of the flat buffer (int64, length offsets[-1])."""
    lengths = (offsets[1:] - offsets[:-1]).to(device)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)


def gram_by_ids(grads, seg: torch.Tensor, num_segments: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[S, K(K+1)/2] per-segment g_i . g_j in the order of :func:`pairs`, accumulated in `dtype`."""
    flat = [g.reshape(-1).to(dtype) for g in grads]
    terms = torch.stack([flat[i] * flat[j] for i, j in pairs(len(flat))], dim=1)
    out = torch.zeros(num_segments, num_pairs(len(flat)), dtype=dtype, device=flat[0].device)
    return out.index_add_(0, seg, terms)


def combine_many_by_ids(grads, seg: torch.Tensor, coeffs: torch.Tensor, dtype: torch.dtype = torch.float64):
    """Flat sum_k coeffs[seg, k] * grads[k], computed in `dtype` (added in the order k = 0, 1, ...)."""
    c = coeffs.to(dtype)
    acc = c[seg, 0] * grads[0].reshape(-1).to(dtype)
    for k in range(1, len(grads)):
        acc = acc + c[seg, k] * grads[k].reshape(-1).to(dtype)
    return acc


def gram(grads, offsets) -> torch.Tensor:
    """[S, K(K+1)/2] float64 per-segment statistics of K flat buffers (see :mod:`pareto_lora.multi`)."""
    grads = check_grads(grads)
    offsets = _checks.as_offsets(offsets)
    s = _checks.check_offsets(offsets, grads[0].numel(), grads[0].device)
    return gram_by_ids(grads, segment_ids(offsets, grads[0].device), s)


def combine_many(grads, offsets, coeffs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = sum_k coeffs[s, k] * grads[k] on every segment s (computed in float64)."""
    offsets = _checks.as_offsets(offsets)
    grads, _ = check_combine_many(grads, offsets, coeffs, out)
    res = combine_many_by_ids(grads, segment_ids(offsets, grads[0].device), coeffs)
    if out is None:
        return res.to(grads[0].dtype).reshape(grads[0].shape)
    out.reshape(-1).copy_(res)
    return out

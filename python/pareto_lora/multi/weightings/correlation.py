"""The correlation matrix of the K gradients, the common ground of imtl_g, aligned_mtl and nash_mtl.

C = D^-1 G D^-1 with D = diag(||g_k||): unit diagonal, entries the cosines, so a rule computed on C
sees no norm ratio (the rank test and the Nash solver do not degrade with 1e6-to-1 norms). A zero
gradient has no direction: its row and column of C are the identity's, which decouples it (its
eigenvalue 1 is set aside by the callers, and its weight is set by each rule: docs/rules.md).
"""

from __future__ import annotations

import torch

__all__ = ["correlation"]


def correlation(gram: torch.Tensor):
    """(C [G, K, K], norms [G, K], zero [G, K] bool) of a valid Gram."""
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    zero = norms == 0
    safe = torch.where(zero, 1.0, norms)
    c = gram / safe[..., :, None] / safe[..., None, :]  # in two divisions: n_i n_j may overflow
    eye = torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
    c = torch.where(eye, 1.0, c)  # exactly 1 on the diagonal (also for a zero row)
    c = torch.where(zero[..., :, None] | zero[..., None, :], eye.to(c.dtype), c)
    return c, norms, zero

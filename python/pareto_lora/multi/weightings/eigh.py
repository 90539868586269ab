"""Batched symmetric eigendecomposition by cyclic Jacobi rotations: no host sync, deterministic.

torch.linalg.eigh synchronises a CUDA device with the host (its documentation says so: it checks
LAPACK/cuSOLVER's convergence flag), which the weightings must not do. For K <= 8 the cyclic Jacobi
method is cheap and accurate: each sweep applies K(K-1)/2 plane rotations, each zeroing one
off-diagonal entry; convergence is quadratic once the off-diagonal part is small, so a fixed
SWEEPS = 10 sweeps reach float64 rounding for every symmetric matrix of size <= 8 (tested against
torch.linalg.eigh). Jacobi is also accurate for small eigenvalues of graded matrices (Demmel &
Veselic 1992), which is what the rank tests of aligned_mtl and config look at.
"""

from __future__ import annotations

import torch

__all__ = ["eigh", "SWEEPS"]

SWEEPS = 10


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending [B, K], eigenvectors as columns [B, K, K]) of symmetric a [B, K, K]."""
    k = a.shape[-1]
    a = a.clone()
    v = torch.eye(k, dtype=a.dtype, device=a.device).expand_as(a).clone()
    for _ in range(SWEEPS):  # a fixed count: no convergence test, no host sync
        for p in range(k - 1):
            for q in range(p + 1, k):
                apq = a[:, p, q]
                live = apq != 0
                theta = (a[:, q, q] - a[:, p, p]) / (2.0 * torch.where(live, apq, 1.0))
                sign = torch.where(theta >= 0, 1.0, -1.0).to(a.dtype)
                t = torch.where(live, sign / (theta.abs() + torch.hypot(theta, torch.ones_like(theta))), 0.0)
                c = torch.rsqrt(t * t + 1.0)
                s = t * c
                # a <- J^T a J with J the rotation in the (p, q) plane; v <- v J
                rp, rq = a[:, p, :].clone(), a[:, q, :].clone()
                a[:, p, :] = c[:, None] * rp - s[:, None] * rq
                a[:, q, :] = s[:, None] * rp + c[:, None] * rq
                cp, cq = a[:, :, p].clone(), a[:, :, q].clone()
                a[:, :, p] = c[:, None] * cp - s[:, None] * cq
                a[:, :, q] = s[:, None] * cp + c[:, None] * cq
                vp, vq = v[:, :, p].clone(), v[:, :, q].clone()
                v[:, :, p] = c[:, None] * vp - s[:, None] * vq
                v[:, :, q] = s[:, None] * vp + c[:, None] * vq
    lam = torch.diagonal(a, dim1=-2, dim2=-1)
    order = torch.sort(lam, dim=-1, stable=True).indices
    return lam.gather(-1, order), v.gather(-1, order[:, None, :].expand_as(v))

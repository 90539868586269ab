"""Baselines the kernels are benchmarked against (not part of the library).

- `per_segment_loop`: what research code does — a Python loop over segments with a host sync
  (.item()) per decision.
- `vectorized_fp32`: the same math with vectorised torch ops in float32 (segment reductions via
  index_add_, coefficients broadcast with repeat_interleave): a fair pure-torch fast path.
The float64 oracle `pareto_lora.reference.integrate` is the third baseline.
"""

import torch

from pareto_lora import reference


def per_segment_loop(a, b, offsets, out, tau=0.5):
    """Pareto LoRA (Algorithm 1) segment by segment, with host syncs."""
    bounds = offsets.tolist()
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        x, y = a[lo:hi].float(), b[lo:hi].float()
        na, nb, dot = x.norm().item(), y.norm().item(), torch.dot(x, y).item()
        if na == 0 or nb == 0:
            g = x + y
        elif dot / (na * nb) < 0:
            d = na * na + nb * nb - 2 * dot
            lam = min(max((nb * nb - dot) / d, 0.0), 1.0) if d > 0 else 0.5
            g = lam * x + (1 - lam) * y
        elif na / nb > tau:
            g = x * (nb / na) + y if na < nb else x + y * (na / nb)
        else:
            g = x + y
        out[lo:hi] = g.to(out.dtype)
    return out


def vectorized_fp32(a, b, offsets, out, tau=0.5):
    """Same math, vectorised torch ops in float32 (several passes and temporaries)."""
    seg = reference.segment_ids(offsets, a.device)
    stats = reference.stats_by_ids(a, b, seg, offsets.numel() - 1, dtype=torch.float32)
    coeffs, _ = reference.rule_coefficients(stats, "pareto_lora", tau)
    out.copy_(reference.combine_by_ids(a, b, seg, coeffs, dtype=torch.float32))
    return out

"""Triton kernels of the K-objective ops (``gram``, ``combine_many``) and their validated wrappers.

The layout of the two-objective kernels (:mod:`.kernels`): the host cuts the flat buffers into
tiles of at most BLOCK elements that never cross a segment boundary (:func:`.ops.tile_table`). The
K buffers reach a kernel as one tuple (K is a compile-time constant, 2 <= K <= 8), so each tile is
read once for all K(K+1)/2 products: one pass over memory. ``tile_gram_kernel`` writes each tile's
sums into its own column of ``partial`` [P, T]; ``gram_reduce_kernel`` adds a segment's tiles with
the lanes and order of ``segment_reduce_kernel``. No atomics: equal inputs give bitwise equal
results, and with K = 2 the sums are the two-objective statistics' bit for bit (same tiles, same
order; columns (0, 0), (0, 1), (1, 1) are segment_stats' 0, 2, 1).

``combine_many_kernel`` computes in float32 (float64 for float64 inputs), like ``combine_kernel``:
acc = c[K-1] g[K-1], then acc = c[k] g[k] + acc for k = K-2 .. 0, rounded once to the output
dtype (K = 2: alpha a + beta b, the two-objective expression).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ... import checks as _checks
from ...multi import checks as _multi_checks
from ...multi.gram import num_pairs
from . import kernels as K
from .launch import BLOCK, LANES, NUM_WARPS, SEGS, _check_device, tile_table

__all__ = ["gram", "combine_many"]


@triton.jit
def _column(i: tl.constexpr, j: tl.constexpr, NUM: tl.constexpr):
    """Column of g_i . g_j (i <= j) in the row-major upper triangle (pareto_lora.multi.pairs)."""
    return i * NUM - i * (i - 1) // 2 + (j - i)


@triton.jit
def tile_gram_kernel(grads, tiles_ptr, partial_ptr, num_tiles, NUM: tl.constexpr, BLOCK: tl.constexpr,
                     F64: tl.constexpr):
    """partial[col(i, j), t] = sum over tile t of g_i * g_j, in float64 (exact products below float64)."""
    t = tl.program_id(0)
    _, start, end = K._load_tile(tiles_ptr, num_tiles, t)
    idx = start + tl.arange(0, BLOCK)
    m = idx < end
    xs = ()
    for k in tl.static_range(NUM):
        xs = xs + (K._widen(tl.load(grads[k] + idx, mask=m, other=0.0), F64).to(tl.float64),)
    for i in tl.static_range(NUM):
        for j in tl.static_range(i, NUM):
            tl.store(partial_ptr + _column(i, j, NUM) * num_tiles + t, tl.sum(xs[i] * xs[j], axis=0))


@triton.jit
def gram_reduce_kernel(partial_ptr, seg_tiles_ptr, stats_ptr, num_tiles, num_segments, P: tl.constexpr,
                       SEGS: tl.constexpr, LANES: tl.constexpr):
    """stats[s, p] = sum of partial[p, seg_tiles[s]:seg_tiles[s+1]]; program (block of SEGS, p).

    segment_reduce_kernel's order: a segment's tiles spread over LANES float64 accumulators (lane =
    tile index mod LANES), then tl.sum over the lanes.
    """
    p = tl.program_id(1)
    segs = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    smask = segs < num_segments
    lo = tl.load(seg_tiles_ptr + segs, mask=smask, other=0)
    hi = tl.load(seg_tiles_ptr + segs + 1, mask=smask, other=0)
    longest = tl.max(hi - lo, axis=0)
    lanes = tl.arange(0, LANES)
    acc = tl.zeros([SEGS, LANES], tl.float64)
    for k in range(0, longest, LANES):
        j = lo[:, None] + k + lanes[None, :]
        acc += tl.load(partial_ptr + p * num_tiles + j, mask=j < hi[:, None], other=0.0)
    tl.store(stats_ptr + P * segs + p, tl.sum(acc, axis=1), mask=smask)


@triton.jit
def combine_many_kernel(grads, out_ptr, tiles_ptr, coeffs_ptr, num_tiles, NUM: tl.constexpr, BLOCK: tl.constexpr,
                        F64: tl.constexpr):
    """out = sum_k coeffs[seg, k] g_k over tile t (coeffs float32 or float64 [S, K])."""
    t = tl.program_id(0)
    seg, start, end = K._load_tile(tiles_ptr, num_tiles, t)
    idx = start + tl.arange(0, BLOCK)
    m = idx < end
    last: tl.constexpr = NUM - 1
    acc = K._widen(tl.load(coeffs_ptr + NUM * seg + last), F64) * \
        K._widen(tl.load(grads[last] + idx, mask=m, other=0.0), F64)
    for r in tl.static_range(1, NUM):
        k: tl.constexpr = NUM - 1 - r
        c = K._widen(tl.load(coeffs_ptr + NUM * seg + k), F64)
        acc = c * K._widen(tl.load(grads[k] + idx, mask=m, other=0.0), F64) + acc
    # Every element is read before it is written by the same program: out may be one of grads.
    tl.store(out_ptr + idx, K._to_out(acc, out_ptr), mask=m)


# ---- ops (no validation, no host reads: traceable by torch.compile) ----------------------------
@triton_op("pareto_lora_triton::gram", mutates_args=())
def _gram_op(grads: list[torch.Tensor], tiles: torch.Tensor, seg_tiles: torch.Tensor) -> torch.Tensor:
    num, num_tiles, num_segments = len(grads), tiles.shape[1], seg_tiles.shape[0] - 1
    p = num_pairs(num)
    device = grads[0].device
    stats = torch.empty((num_segments, p), dtype=torch.float64, device=device)
    partial = torch.empty((p, num_tiles), dtype=torch.float64, device=device)
    f64 = grads[0].dtype == torch.float64
    if num_tiles > 0:
        wrap_triton(tile_gram_kernel)[(num_tiles,)](
            tuple(grads), tiles, partial, num_tiles, NUM=num, BLOCK=BLOCK, F64=f64, num_warps=NUM_WARPS
        )
    if num_segments > 0:
        wrap_triton(gram_reduce_kernel)[(triton.cdiv(num_segments, SEGS), p)](
            partial, seg_tiles, stats, num_tiles, num_segments, P=p, SEGS=SEGS, LANES=LANES
        )
    return stats


@triton_op("pareto_lora_triton::combine_many", mutates_args={"out"})
def _combine_many_op(grads: list[torch.Tensor], tiles: torch.Tensor, coeffs: torch.Tensor, out: torch.Tensor) -> None:
    num_tiles = tiles.shape[1]
    if num_tiles > 0:
        wrap_triton(combine_many_kernel)[(num_tiles,)](
            tuple(grads), out, tiles, coeffs.contiguous(), num_tiles, NUM=len(grads), BLOCK=BLOCK,
            F64=grads[0].dtype == torch.float64, num_warps=NUM_WARPS,
        )


# ---- validated entry points (the registry's functions for backend="triton") ---------------------
def gram(grads, offsets) -> torch.Tensor:
    """[S, K(K+1)/2] float64 per-segment g_i . g_j (columns: pareto_lora.multi.pairs(K))."""
    offsets = _checks.as_offsets(offsets)
    grads = _multi_checks.check_grads(grads)
    _checks.check_offsets(offsets, grads[0].numel(), grads[0].device)
    _check_device(grads[0].device)
    tiles, seg_tiles = tile_table(offsets, grads[0].device)
    return torch.ops.pareto_lora_triton.gram(list(grads), tiles, seg_tiles)


def combine_many(grads, offsets, coeffs: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_s = sum_k coeffs[s, k] grads[k]_s; `out` may be one of grads (a new tensor when None)."""
    offsets = _checks.as_offsets(offsets)
    grads, _ = _multi_checks.check_combine_many(grads, offsets, coeffs, out)
    _check_device(grads[0].device)
    out = torch.empty_like(grads[0]) if out is None else out
    tiles, _ = tile_table(offsets, grads[0].device)
    torch.ops.pareto_lora_triton.combine_many(list(grads), tiles, coeffs, out)
    return out

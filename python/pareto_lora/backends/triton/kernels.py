"""Triton kernels of the integration op (launched from :mod:`pareto_lora.backends.triton.ops`).

Work layout: the host cuts the flat buffer into tiles of at most BLOCK elements that never cross a
segment boundary; ``tiles`` is int64 [3, T] with rows (segment, start, end), ``seg_tiles`` is
int64 [G + 1] with segment s owning tiles seg_tiles[s] .. seg_tiles[s + 1]. One program per tile
writes its sums into its own slot of ``partial`` [3, T]; a second kernel adds a segment's slots in
tile order. Nothing is accumulated with atomics, so equal inputs give bitwise equal results.

The statistics are sums of products computed in float64 (exact for float32 inputs), so they are
accurate over the whole float32 range, and they are returned in float64; the rule runs in
float64 on them, following csrc/rule.h case by case. The combine computes in float32 (float64
for float64 inputs) and rounds bf16 results to nearest even, like torch.
"""

import triton
import triton.language as tl

from ...rules import CAUCHY_SCHWARZ_SLACK, KERNEL_PARAMS, MAX_COEFFICIENT, MAX_TERM, RULE_IDS, STATIONARY_REL, Case
from .family_b import RULE_ALIGNED_MTL, RULE_CAGRAD, RULE_CONFIG, RULE_NASH_MTL, family_b

# Case codes and rule ids, derived from pareto_lora.rules (which csrc/rule.h mirrors).
SUMMED: tl.constexpr = tl.constexpr(int(Case.SUMMED))
RESCALED: tl.constexpr = tl.constexpr(int(Case.RESCALED))
PARETO: tl.constexpr = tl.constexpr(int(Case.PARETO))
INACTIVE: tl.constexpr = tl.constexpr(int(Case.INACTIVE))
DEGENERATE: tl.constexpr = tl.constexpr(int(Case.DEGENERATE))
NONFINITE: tl.constexpr = tl.constexpr(int(Case.NONFINITE))
STATIONARY: tl.constexpr = tl.constexpr(int(Case.STATIONARY))
WEIGHTED: tl.constexpr = tl.constexpr(int(Case.WEIGHTED))

RULE_SUM: tl.constexpr = tl.constexpr(RULE_IDS["sum"])
RULE_PARETO_LORA: tl.constexpr = tl.constexpr(RULE_IDS["pareto_lora"])
RULE_PARETO_ONLY: tl.constexpr = tl.constexpr(RULE_IDS["pareto_only"])
RULE_RESCALE_ONLY: tl.constexpr = tl.constexpr(RULE_IDS["rescale_only"])
RULE_MGDA: tl.constexpr = tl.constexpr(RULE_IDS["mgda"])
RULE_MMPARETO: tl.constexpr = tl.constexpr(RULE_IDS["mmpareto"])
RULE_MEAN: tl.constexpr = tl.constexpr(RULE_IDS["mean"])
RULE_CONSTANT: tl.constexpr = tl.constexpr(RULE_IDS["constant"])
RULE_UPGRAD: tl.constexpr = tl.constexpr(RULE_IDS["upgrad"])
RULE_PCGRAD: tl.constexpr = tl.constexpr(RULE_IDS["pcgrad"])
RULE_DUALPROJ: tl.constexpr = tl.constexpr(RULE_IDS["dualproj"])
RULE_IMTL_G: tl.constexpr = tl.constexpr(RULE_IDS["imtl_g"])

# Where each rule parameter sits in the float64 params vector (rules.KERNEL_PARAMS).
P_TAU: tl.constexpr = tl.constexpr(KERNEL_PARAMS.index("tau"))
P_GAMMA: tl.constexpr = tl.constexpr(KERNEL_PARAMS.index("gamma"))
P_MARGIN: tl.constexpr = tl.constexpr(KERNEL_PARAMS.index("margin"))
P_C: tl.constexpr = tl.constexpr(KERNEL_PARAMS.index("c"))
P_W_A: tl.constexpr = tl.constexpr(KERNEL_PARAMS.index("w_a"))
P_W_B: tl.constexpr = tl.constexpr(KERNEL_PARAMS.index("w_b"))
P_MAX_NORM: tl.constexpr = tl.constexpr(KERNEL_PARAMS.index("max_norm"))
P_REG_EPS: tl.constexpr = tl.constexpr(KERNEL_PARAMS.index("reg_eps"))

CS_SLACK: tl.constexpr = tl.constexpr(CAUCHY_SCHWARZ_SLACK)
STATIONARY_RELATIVE: tl.constexpr = tl.constexpr(STATIONARY_REL)
MAX_COEF: tl.constexpr = tl.constexpr(MAX_COEFFICIENT)
TERM_MAX: tl.constexpr = tl.constexpr(MAX_TERM)


@triton.jit
def _widen(x, F64: tl.constexpr):
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _load_tile(tiles_ptr, num_tiles, t):
    seg = tl.load(tiles_ptr + t)
    start = tl.load(tiles_ptr + num_tiles + t)
    end = tl.load(tiles_ptr + 2 * num_tiles + t)
    return seg, start, end


@triton.jit
def tile_stats_kernel(a_ptr, b_ptr, tiles_ptr, partial_ptr, num_tiles, BLOCK: tl.constexpr, F64: tl.constexpr):
    """partial[:, t] = (sum a^2, sum b^2, sum a*b) over tile t, in float64."""
    t = tl.program_id(0)
    _, start, end = _load_tile(tiles_ptr, num_tiles, t)
    idx = start + tl.arange(0, BLOCK)
    m = idx < end
    # bf16/fp16 -> float32 -> float64 are exact; a float32 product is exact in float64, so tiny
    # (|x| ~ 1e-23) and huge (|x| ~ 1e20) values keep their squares.
    x = _widen(tl.load(a_ptr + idx, mask=m, other=0.0), F64).to(tl.float64)
    y = _widen(tl.load(b_ptr + idx, mask=m, other=0.0), F64).to(tl.float64)
    tl.store(partial_ptr + t, tl.sum(x * x, axis=0))
    tl.store(partial_ptr + num_tiles + t, tl.sum(y * y, axis=0))
    tl.store(partial_ptr + 2 * num_tiles + t, tl.sum(x * y, axis=0))


# C's fmax/fmin (rule.h uses them): a NaN operand yields the other one. tl.maximum's NaN
# behaviour differs between the GPU and the interpreter, so it is spelled out.
@triton.jit
def _fmax(x, y):
    return tl.where((x >= y) | (y != y), x, y)


@triton.jit
def _fmin(x, y):
    return tl.where((x <= y) | (y != y), x, y)


@triton.jit
def _projection_weights(aa, bb, ab, reg, one):
    """rule.h gram_weighting's q_a = -a.b/(||a||^2 + reg), q_b likewise, only where a.b < 0 (both norms > 0)."""
    neg = ab < 0.0
    qa = tl.where(neg, -ab / tl.where(neg, aa + reg, one), 0.0)
    qb = tl.where(neg, -ab / tl.where(neg, bb + reg, one), 0.0)
    return qa, qb


@triton.jit
def _rule(aa, bb, ab, act, params_ptr, RULE: tl.constexpr, SYMMETRIC: tl.constexpr):
    """(alpha, beta, case) of csrc/rule.h compute_rule, elementwise over float64 blocks.

    ``params_ptr``: the rule's parameters, float64 in the order of rules.KERNEL_PARAMS (a rule
    loads the ones it uses: ``tl.load(params_ptr + P_C)``); SYMMETRIC is ``symmetric``'s value.

    rule.h returns early in priority order (non-finite, inactive, sum, mgda, degenerate, rule);
    here each later-priority result is computed first and overridden by the earlier ones.
    """
    tau = tl.load(params_ptr + P_TAU)
    gamma = tl.load(params_ptr + P_GAMMA)
    margin = tl.load(params_ptr + P_MARGIN)
    one = tl.full(aa.shape, 1.0, tl.float64)
    alpha = one
    beta = one
    code = tl.full(aa.shape, SUMMED, tl.int32)
    # Not valid: a negative squared norm or |a.b| > ||a|| ||b|| beyond rounding (NONFINITE below);
    # within rounding a.b is clamped to the nearest valid value.
    # x - x is 0 for finite x and NaN otherwise (rule.h's is_finite); taken before the clamp,
    # which would replace a NaN a.b (fmax/fmin return the other operand).
    finite = ((aa - aa) == 0.0) & ((bb - bb) == 0.0) & ((ab - ab) == 0.0)
    bound = tl.sqrt(_fmax(aa, 0.0)) * tl.sqrt(_fmax(bb, 0.0))
    invalid = (aa < 0.0) | (bb < 0.0) | (tl.abs(ab) > bound * (1.0 + CS_SLACK))
    ab = _fmin(_fmax(ab, -bound), bound)

    diff2 = aa + bb - 2.0 * ab
    has_diff = diff2 > 0.0
    lam = tl.where(has_diff, _fmin(_fmax((bb - ab) / tl.where(has_diff, diff2, one), 0.0), 1.0), 0.5)
    degenerate = (aa == 0.0) | (bb == 0.0)
    na = tl.sqrt(aa)
    nb = tl.sqrt(bb)
    # cos < -margin (rule.h); margin 0 keeps the plain ab < 0
    conflict = tl.where(margin > 0.0, ab < -margin * (na * nb), ab < 0.0)
    if SYMMETRIC:
        imbalanced = _fmax(na, nb) * tau > _fmin(na, nb)
    else:
        imbalanced = na > tau * nb
    # The safe divisors only differ from na/nb where the segment is degenerate (overridden below).
    ra = tl.where(na < nb, nb / tl.where(na > 0.0, na, one), one)
    rb = tl.where(nb < na, na / tl.where(nb > 0.0, nb, one), one)

    if RULE == RULE_MGDA:
        alpha = lam
        beta = 1.0 - lam
        code = tl.where(degenerate, DEGENERATE, PARETO)
    elif RULE == RULE_MEAN:
        alpha = 0.5 * one
        beta = 0.5 * one
        code = tl.full(aa.shape, WEIGHTED, tl.int32)
    elif RULE == RULE_CONSTANT:
        alpha = tl.load(params_ptr + P_W_A) * one
        beta = tl.load(params_ptr + P_W_B) * one
        code = tl.full(aa.shape, WEIGHTED, tl.int32)
    elif RULE == RULE_IMTL_G:
        # rule.h gram_weighting: (||b||, ||a||)/(||a|| + ||b||); a zero norm: plain sum, DEGENERATE
        total = tl.where(degenerate, one, na + nb)
        alpha = tl.where(degenerate, one, nb / total)
        beta = tl.where(degenerate, one, na / total)
        code = tl.where(degenerate, DEGENERATE, WEIGHTED)
    elif RULE == RULE_PCGRAD:
        qa, qb = _projection_weights(aa, bb, ab, 0.0 * one, one)
        alpha = 1.0 + qa
        beta = 1.0 + qb
        code = tl.where(ab < 0.0, PARETO, SUMMED)
    elif RULE == RULE_UPGRAD:
        qa, qb = _projection_weights(aa, bb, ab, tl.load(params_ptr + P_REG_EPS) * (aa + bb), one)
        alpha = 0.5 * (1.0 + qa)
        beta = 0.5 * (1.0 + qb)
        code = tl.where(ab < 0.0, PARETO, WEIGHTED)
    elif RULE == RULE_DUALPROJ:
        qa, qb = _projection_weights(aa, bb, ab, tl.load(params_ptr + P_REG_EPS) * (aa + bb), one)
        alpha = 0.5 * _fmax(qa, 1.0)
        beta = 0.5 * _fmax(qb, 1.0)
        code = tl.where((qa > 1.0) | (qb > 1.0), PARETO, WEIGHTED)
    elif (RULE == RULE_CAGRAD) or (RULE == RULE_NASH_MTL) or (RULE == RULE_ALIGNED_MTL) or (RULE == RULE_CONFIG):
        # torchjd's aggregators, with their own zero-norm handling (family_b.py, rule.h family_b)
        alpha, beta, code = family_b(aa, bb, ab, tl.load(params_ptr + P_C), tl.load(params_ptr + P_MAX_NORM), RULE)
    elif RULE != RULE_SUM:
        if RULE == RULE_PARETO_LORA:
            alpha = tl.where(conflict, lam, tl.where(imbalanced, ra, one))
            beta = tl.where(conflict, 1.0 - lam, tl.where(imbalanced, rb, one))
            code = tl.where(conflict, PARETO, tl.where(imbalanced, RESCALED, SUMMED))
        elif RULE == RULE_PARETO_ONLY:
            alpha = tl.where(conflict, lam, one)
            beta = tl.where(conflict, 1.0 - lam, one)
            code = tl.where(conflict, PARETO, SUMMED)
        elif RULE == RULE_RESCALE_ONLY:
            alpha = tl.where(imbalanced, ra, one)
            beta = tl.where(imbalanced, rb, one)
            code = tl.where(imbalanced, RESCALED, SUMMED)
        else:  # RULE_MMPARETO
            ha = tl.where(conflict, 2.0 * lam, one)
            hb = tl.where(conflict, 2.0 * (1.0 - lam), one)
            h2 = ha * ha * aa + hb * hb * bb + 2.0 * ha * hb * ab
            reach = ha * na + hb * nb
            moving = h2 > STATIONARY_RELATIVE * reach * reach
            scale = gamma * tl.sqrt(_fmax(aa + bb + 2.0 * ab, 0.0)) / tl.sqrt(tl.where(moving, h2, one))
            alpha = tl.where(moving, scale * ha, 0.0)
            beta = tl.where(moving, scale * hb, 0.0)
            code = tl.where(moving, tl.where(conflict, PARETO, SUMMED), STATIONARY)
        alpha = tl.where(degenerate, one, alpha)
        beta = tl.where(degenerate, one, beta)
        code = tl.where(degenerate, DEGENERATE, code)

    # A coefficient float32 cannot hold, or one whose scaled buffer could overflow float32
    # (rules.term_fits), never produces an inf: plain sum, NONFINITE.
    ma = tl.abs(alpha)
    mb = tl.abs(beta)
    fits = (ma <= MAX_COEF) & ((ma <= 1.0) | (ma * na <= TERM_MAX))
    fits = fits & (mb <= MAX_COEF) & ((mb <= 1.0) | (mb * nb <= TERM_MAX))
    alpha = tl.where(fits, alpha, one)
    beta = tl.where(fits, beta, one)
    code = tl.where(fits, code, NONFINITE)
    alpha = tl.where(act, alpha, one)
    beta = tl.where(act, beta, one)
    code = tl.where(act, code, INACTIVE)
    finite = finite & ~invalid
    alpha = tl.where(finite, alpha, one)
    beta = tl.where(finite, beta, one)
    code = tl.where(finite, code, NONFINITE)
    return alpha, beta, code


@triton.jit
def _rule_store(
    aa, bb, ab, segs, mask, active_ptr, coeffs_ptr, cases_ptr, params_ptr,
    HAS_ACTIVE: tl.constexpr, RULE: tl.constexpr, SYMMETRIC: tl.constexpr,
):
    # The parameters arrive as a float64 tensor rather than scalar arguments: a Python float kernel
    # argument would be narrowed to float32 (the rule must see the same double as the C++ kernels),
    # and a tensor lets a new parameter be added without touching any kernel's signature.
    if HAS_ACTIVE:
        act = tl.load(active_ptr + segs, mask=mask, other=1) != 0
    else:
        act = tl.full(aa.shape, 1, tl.int1)
    alpha, beta, code = _rule(aa, bb, ab, act, params_ptr, RULE, SYMMETRIC)
    tl.store(coeffs_ptr + 2 * segs, alpha.to(tl.float32), mask=mask)
    tl.store(coeffs_ptr + 2 * segs + 1, beta.to(tl.float32), mask=mask)
    tl.store(cases_ptr + segs, code, mask=mask)


@triton.jit
def segment_reduce_kernel(
    partial_ptr, seg_tiles_ptr, stats_ptr, num_tiles, num_segments,
    active_ptr, coeffs_ptr, cases_ptr, params_ptr,
    SEGS: tl.constexpr, LANES: tl.constexpr,
    APPLY_RULE: tl.constexpr, HAS_ACTIVE: tl.constexpr, RULE: tl.constexpr, SYMMETRIC: tl.constexpr,
):
    """stats[s] = sum of partial[:, seg_tiles[s]:seg_tiles[s+1]] for SEGS segments per program.

    Each segment's tiles are spread over LANES float64 accumulators (lane = tile index mod LANES)
    and the lanes are then reduced by tl.sum: a fixed order, whatever the launch. With APPLY_RULE
    the rule runs on the float32-rounded stats (what segment_stats + rule_coefficients would see).
    """
    segs = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    smask = segs < num_segments
    lo = tl.load(seg_tiles_ptr + segs, mask=smask, other=0)
    hi = tl.load(seg_tiles_ptr + segs + 1, mask=smask, other=0)
    longest = tl.max(hi - lo, axis=0)
    lanes = tl.arange(0, LANES)
    acc_aa = tl.zeros([SEGS, LANES], tl.float64)
    acc_bb = tl.zeros([SEGS, LANES], tl.float64)
    acc_ab = tl.zeros([SEGS, LANES], tl.float64)
    for k in range(0, longest, LANES):
        j = lo[:, None] + k + lanes[None, :]
        m = j < hi[:, None]
        acc_aa += tl.load(partial_ptr + j, mask=m, other=0.0)
        acc_bb += tl.load(partial_ptr + num_tiles + j, mask=m, other=0.0)
        acc_ab += tl.load(partial_ptr + 2 * num_tiles + j, mask=m, other=0.0)
    aa = tl.sum(acc_aa, axis=1)
    bb = tl.sum(acc_bb, axis=1)
    ab = tl.sum(acc_ab, axis=1)
    tl.store(stats_ptr + 3 * segs, aa, mask=smask)
    tl.store(stats_ptr + 3 * segs + 1, bb, mask=smask)
    tl.store(stats_ptr + 3 * segs + 2, ab, mask=smask)
    if APPLY_RULE:
        _rule_store(
            aa, bb, ab, segs, smask, active_ptr, coeffs_ptr, cases_ptr, params_ptr,
            HAS_ACTIVE, RULE, SYMMETRIC,
        )


@triton.jit
def rule_kernel(
    stats_ptr, num_segments, active_ptr, coeffs_ptr, cases_ptr, params_ptr,
    SEGS: tl.constexpr, HAS_ACTIVE: tl.constexpr, RULE: tl.constexpr, SYMMETRIC: tl.constexpr,
):
    """(coeffs, cases) from stats of any source (float32 or float64, [G, 3] contiguous)."""
    segs = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    smask = segs < num_segments
    aa = tl.load(stats_ptr + 3 * segs, mask=smask, other=0.0).to(tl.float64)
    bb = tl.load(stats_ptr + 3 * segs + 1, mask=smask, other=0.0).to(tl.float64)
    ab = tl.load(stats_ptr + 3 * segs + 2, mask=smask, other=0.0).to(tl.float64)
    _rule_store(aa, bb, ab, segs, smask, active_ptr, coeffs_ptr, cases_ptr, params_ptr,
                HAS_ACTIVE, RULE, SYMMETRIC)


@triton.jit
def group_rule_kernel(
    stats_ptr, groups_ptr, num_groups, group_stats_ptr, poison_ptr, active_ptr, coeffs_ptr, cases_ptr,
    params_ptr,
    SEGS: tl.constexpr, HAS_POISON: tl.constexpr, HAS_ACTIVE: tl.constexpr, RULE: tl.constexpr,
    SYMMETRIC: tl.constexpr,
):
    """Group g's statistics = +0.0 + stats[groups[g]] + ... + stats[groups[g+1] - 1], added left
    to right (reference.group_sums: the one order on every backend), then its rule. SEGS groups per
    program. A masked-off row adds +0.0, which leaves a sum that started at +0.0 unchanged.
    With poison true every case is NONFINITE (the combine reads poison too); coeffs stay the rule's."""
    gs = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    gmask = gs < num_groups
    first = tl.load(groups_ptr + gs, mask=gmask, other=0)
    end = tl.load(groups_ptr + gs + 1, mask=gmask, other=0)
    longest = tl.max(end - first, axis=0)
    aa = tl.zeros([SEGS], tl.float64)
    bb = tl.zeros([SEGS], tl.float64)
    ab = tl.zeros([SEGS], tl.float64)
    for k in range(0, longest):
        row = first + k
        m = row < end
        aa += tl.load(stats_ptr + 3 * row, mask=m, other=0.0)
        bb += tl.load(stats_ptr + 3 * row + 1, mask=m, other=0.0)
        ab += tl.load(stats_ptr + 3 * row + 2, mask=m, other=0.0)
    tl.store(group_stats_ptr + 3 * gs, aa, mask=gmask)
    tl.store(group_stats_ptr + 3 * gs + 1, bb, mask=gmask)
    tl.store(group_stats_ptr + 3 * gs + 2, ab, mask=gmask)
    _rule_store(aa, bb, ab, gs, gmask, active_ptr, coeffs_ptr, cases_ptr, params_ptr, HAS_ACTIVE, RULE, SYMMETRIC)
    if HAS_POISON:
        poisoned = tl.load(poison_ptr) != 0
        code = tl.load(cases_ptr + gs, mask=gmask, other=0)
        tl.store(cases_ptr + gs, tl.where(poisoned, NONFINITE, code), mask=gmask)


@triton.jit
def combine_kernel(a_ptr, b_ptr, out_ptr, tiles_ptr, coeffs_ptr, num_tiles, BLOCK: tl.constexpr, F64: tl.constexpr,
                   poison_ptr=None, HAS_POISON: tl.constexpr = False):
    """out = alpha[i] * a + beta[i] * b over tile t, i = the tile's first row (its segment, or its
    group in a grouped call); coeffs float32 or float64. A true poison makes them NaN."""
    t = tl.program_id(0)
    seg, start, end = _load_tile(tiles_ptr, num_tiles, t)
    alpha = _widen(tl.load(coeffs_ptr + 2 * seg), F64)
    beta = _widen(tl.load(coeffs_ptr + 2 * seg + 1), F64)
    if HAS_POISON:
        poisoned = tl.load(poison_ptr) != 0
        alpha = tl.where(poisoned, float("nan"), alpha)
        beta = tl.where(poisoned, float("nan"), beta)
    idx = start + tl.arange(0, BLOCK)
    m = idx < end
    x = _widen(tl.load(a_ptr + idx, mask=m, other=0.0), F64)
    y = _widen(tl.load(b_ptr + idx, mask=m, other=0.0), F64)
    # Every element is read before it is written by the same program: out may alias a or b.
    tl.store(out_ptr + idx, _to_out(alpha * x + beta * y, out_ptr), mask=m)


@triton.jit
def _to_out(v, out_ptr):
    """`v` in the output's dtype, rounded to nearest even (as torch and the C++ kernels round)."""
    ty: tl.constexpr = out_ptr.dtype.element_ty
    if ty == tl.bfloat16:
        # By hand: the interpreter's float32 -> bfloat16 cast truncates. Adding 0x7FFF plus the
        # lowest kept bit, then dropping 16 bits, rounds half to even; NaN stays NaN.
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ty)

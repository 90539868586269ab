"""Triton side of the rules cagrad, nash_mtl, aligned_mtl and config (torchjd's aggregators on two rows).

The same closed forms as csrc/rule.h ``family_b`` and the float64 oracle (reference.py ``_family_b``),
step for step and in float64, elementwise over blocks of segments; the derivations are in
docs/rules.md. Called from :func:`pareto_lora.backends.triton.kernels._rule`, which applies the
precedence (non-finite, inactive, term_fits) on top.
"""

import triton
import triton.language as tl

from ...rules import CAGRAD_NORM_EPS, CAUCHY_SCHWARZ_SLACK, RULE_IDS, STATIONARY_REL, Case

WEIGHTED: tl.constexpr = tl.constexpr(int(Case.WEIGHTED))
DEGENERATE: tl.constexpr = tl.constexpr(int(Case.DEGENERATE))
STATIONARY: tl.constexpr = tl.constexpr(int(Case.STATIONARY))
RULE_CAGRAD: tl.constexpr = tl.constexpr(RULE_IDS["cagrad"])
RULE_NASH_MTL: tl.constexpr = tl.constexpr(RULE_IDS["nash_mtl"])
RULE_ALIGNED_MTL: tl.constexpr = tl.constexpr(RULE_IDS["aligned_mtl"])
RULE_CONFIG: tl.constexpr = tl.constexpr(RULE_IDS["config"])

CS_SLACK: tl.constexpr = tl.constexpr(CAUCHY_SCHWARZ_SLACK)
STATIONARY_RELATIVE: tl.constexpr = tl.constexpr(STATIONARY_REL)
NORM_EPS: tl.constexpr = tl.constexpr(CAGRAD_NORM_EPS)


@triton.jit
def _clip01(x):
    # fmin(fmax(x, 0), 1) of rule.h; x is never NaN here
    return tl.where(x < 0.0, 0.0, tl.where(x > 1.0, 1.0, x))


@triton.jit
def _aligned_mtl(pa, pb, w, det, cos):
    r = tl.sqrt(0.25 * (pa - pb) * (pa - pb) + w * w)
    l_plus = 0.5 + r
    l_minus = det / l_plus
    rank1 = tl.abs(cos) >= 1.0 - CS_SLACK
    gap = tl.where(rank1, 2.0 * r, 1.0)
    d = tl.sqrt(det)
    den = 2.0 * tl.sqrt(l_plus) * (tl.sqrt(l_plus) + tl.sqrt(l_minus))
    alpha = tl.where(rank1, (pa + w - l_minus) / (2.0 * gap), (pb - w + d) / den)
    beta = tl.where(rank1, (pb + w - l_minus) / (2.0 * gap), (pa - w + d) / den)
    return alpha, beta


@triton.jit
def _cagrad(pa, pb, w, det, c):
    s = 0.5 * (pa - pb)
    diff2 = pa + pb - 2.0 * w
    quarter = 0.25 * (pa + pb + 2.0 * w)
    k = c * tl.sqrt(tl.where(quarter > 0.0, quarter, 0.0))
    disc = k * k * diff2 - s * s
    has_diff = diff2 > 0.0
    safe_diff2 = tl.where(has_diff, diff2, 1.0)
    inner = has_diff & (disc > 0.0)
    lam = _clip01((pb - w) / safe_diff2)
    u = -s * tl.sqrt(det) / tl.sqrt(tl.where(inner, disc, 1.0))
    edge = tl.where(s > 0.0, 0.0, tl.where(s < 0.0, 1.0, lam))
    x = tl.where(inner, _clip01((pb - w + u) / safe_diff2), edge)
    x = tl.where(has_diff, x, 0.5)
    gx2 = x * x * pa + 2.0 * x * (1.0 - x) * w + (1.0 - x) * (1.0 - x) * pb
    gx2 = tl.where(gx2 > 0.0, gx2, 0.0)
    reach = x * tl.sqrt(pa) + (1.0 - x) * tl.sqrt(pb)
    moving = (gx2 >= NORM_EPS * NORM_EPS) & (gx2 > STATIONARY_RELATIVE * reach * reach)
    ratio = k / tl.sqrt(tl.where(moving, gx2, 1.0))
    alpha = tl.where(moving, 0.5 + ratio * x, 0.0)
    beta = tl.where(moving, 0.5 + ratio * (1.0 - x), 0.0)
    return alpha, beta, tl.where(moving, WEIGHTED, STATIONARY)


@triton.jit
def family_b(aa, bb, ab, c, max_norm, RULE: tl.constexpr):
    """(alpha, beta, case) of rule.h family_b on valid statistics (float64 blocks)."""
    one = tl.full(aa.shape, 1.0, tl.float64)
    zero = tl.full(aa.shape, 0.0, tl.float64)
    na = tl.sqrt(aa)
    nb = tl.sqrt(bb)
    degenerate = (aa == 0.0) | (bb == 0.0)
    safe_na = tl.where(na > 0.0, na, one)
    safe_nb = tl.where(nb > 0.0, nb, one)
    cos = tl.where(degenerate, zero, ab / safe_na / safe_nb)
    code = tl.full(aa.shape, WEIGHTED, tl.int32)
    if RULE == RULE_CONFIG:
        alpha = 0.5 + 0.5 * nb / safe_na
        beta = 0.5 + 0.5 * na / safe_nb
        deg_alpha = one
        deg_beta = one
    elif RULE == RULE_NASH_MTL:
        limit = tl.where(max_norm > 0.0, max_norm, float("inf")) + zero
        sqrt2 = tl.sqrt(2.0 + zero)
        h2 = 2.0 + 2.0 * cos
        moving = h2 > STATIONARY_RELATIVE * 4.0
        scale = tl.where(limit < sqrt2, limit, sqrt2) / tl.sqrt(tl.where(moving, h2, one))
        alpha = tl.where(moving, scale / safe_na, zero)
        beta = tl.where(moving, scale / safe_nb, zero)
        code = tl.where(moving, code, STATIONARY)
        unit = tl.where(limit < 1.0, limit, one)
        deg_alpha = tl.where(na > 0.0, unit / safe_na, zero)
        deg_beta = tl.where(nb > 0.0, unit / safe_nb, zero)
    else:
        t = tl.where(degenerate, one, aa + bb)
        pa = aa / t
        pb = bb / t
        w = ab / t
        det = pa * pb - w * w
        det = tl.where(det > 0.0, det, 0.0)
        if RULE == RULE_ALIGNED_MTL:
            alpha, beta = _aligned_mtl(pa, pb, w, det, cos)
            deg_alpha = 0.5 * one
            deg_beta = 0.5 * one
        else:  # RULE_CAGRAD
            alpha, beta, code = _cagrad(pa, pb, w, det, c)
            deg_alpha = zero
            deg_beta = zero
    alpha = tl.where(degenerate, deg_alpha, alpha)
    beta = tl.where(degenerate, deg_beta, beta)
    code = tl.where(degenerate, DEGENERATE, code)
    return alpha, beta, code

"""Pure-torch reference of the integration op: the oracle every kernel is tested against.

Everything is vectorised over segments (no Python loop over G) and accumulates in float64.
Statistics are float64 and coefficients float32, exactly like the compiled ops; float64 inputs
get float64 coefficients from :func:`integrate` (the oracle of float64 training).

The rule is written once here, in terms of the three per-segment statistics
(||a||^2, ||b||^2, a.b); ``csrc/rule.h`` and the Triton kernel implement the same table.
It is also the ``backend="reference"`` entry of the registry: it implements
:class:`pareto_lora.backends.protocol.Backend` like every other backend (the rule is one
:class:`RuleSpec`; the loose keywords belong to the public functions, e.g.
``pareto_lora.integrate(..., backend="reference")``).
"""

from __future__ import annotations

import math

import torch

from . import checks as _checks
from .multi.reference import combine_many, gram  # the K-objective half of the oracle (a backend's two K ops)
from .multi.reference import segment_ids  # one definition, in the lower layer; re-exported here
from .result import IntegrationResult
from .rules import CAGRAD_NORM_EPS, CAUCHY_SCHWARZ_SLACK, STATIONARY_REL, DEFAULT_RULE, Case, RuleSpec, term_fits

__all__ = [
    "gram",
    "combine_many",
    "segment_stats",
    "rule_coefficients",
    "combine",
    "integrate",
    "is_available",
    "segment_ids",
    "stats_by_ids",
    "combine_by_ids",
    "group_sums",
    "segment_groups",
]


def is_available(device_type: str) -> bool:
    """The reference runs wherever torch does."""
    return True


# The arithmetic without argument checks, on precomputed segment ids: the checks read the
# offsets on the host, which torch.compile cannot trace (the benchmarks compile these).
def stats_by_ids(
    a: torch.Tensor, b: torch.Tensor, seg: torch.Tensor, num_segments: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """[G, 3] ||a||^2, ||b||^2, a.b per segment, accumulated in `dtype`; seg = segment_ids(offsets)."""
    x, y = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    terms = torch.stack([x * x, y * y, x * y], dim=1)
    return torch.zeros(num_segments, 3, dtype=dtype, device=a.device).index_add_(0, seg, terms)


def combine_by_ids(
    a: torch.Tensor, b: torch.Tensor, seg: torch.Tensor, coeffs: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Flat alpha[seg] * a + beta[seg] * b, computed in `dtype`."""
    c = coeffs.to(dtype)
    return c[seg, 0] * a.reshape(-1).to(dtype) + c[seg, 1] * b.reshape(-1).to(dtype)


def segment_stats(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[G, 3] float64 with columns ||a||^2, ||b||^2, a.b per segment (accumulated in float64)."""
    offsets = _checks.as_offsets(offsets)
    _checks.check_buffers(a, b)
    g = _checks.check_offsets(offsets, a.numel(), a.device)
    return stats_by_ids(a, b, segment_ids(offsets, a.device), g)


def rule_coefficients(
    stats: torch.Tensor, spec: RuleSpec = DEFAULT_RULE, *, active: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form rule: (coeffs [G, 2] = (alpha, beta), cases [G] int32) from the stats.

    The arithmetic runs in float64 whatever the stats dtype; coefficients are float32, as on
    every backend (only :func:`integrate` on float64 inputs keeps them in float64).
    """
    _check_spec(spec)
    active = _checks.as_active(active)
    _checks.check_rule_args(stats, active)
    return _rule(stats, spec, active)


def _check_spec(spec) -> None:
    # The oracle is called directly (tests, benchmarks): a rule name here is a call written for the
    # public functions, which take it; say so rather than fail on a missing attribute.
    if not isinstance(spec, RuleSpec):
        raise ValueError(f"spec: expected a pareto_lora.RuleSpec (the public functions take a rule name), "
                         f"got {type(spec).__name__}")
    spec.kernel_params()  # two objectives: the one check that weights is a pair, as the kernels make it


def _rule(
    stats: torch.Tensor, spec: RuleSpec, active: torch.Tensor | None, coeff_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g, dev = stats.shape[0], stats.device
    rule, tau, gamma = spec.name, spec.tau, spec.gamma
    s = stats.to(torch.float64)
    aa, bb, ab = s[:, 0], s[:, 1], s[:, 2]
    one = torch.ones(g, dtype=torch.float64, device=dev)
    # Statistics that are not valid (negative squared norm, |a.b| > ||a|| ||b|| beyond rounding)
    # are NONFINITE; within rounding a.b is clamped to the nearest valid value (csrc/rule.h).
    bound = aa.clamp_min(0).sqrt() * bb.clamp_min(0).sqrt()
    invalid = (aa < 0) | (bb < 0) | (ab.abs() > bound * (1.0 + CAUCHY_SCHWARZ_SLACK))
    ab = torch.minimum(torch.maximum(ab, -bound), bound)
    alpha, beta = one.clone(), one.clone()
    case = torch.full((g,), int(Case.SUMMED), dtype=torch.int32, device=dev)

    def put(mask, c, al, be):
        nonlocal alpha, beta, case
        alpha = torch.where(mask, al, alpha)
        beta = torch.where(mask, be, beta)
        case = torch.where(mask, torch.full_like(case, int(c)), case)

    # MGDA min-norm weight on a: lambda = clip(((b-a).b) / ||a-b||^2, 0, 1); 0.5 if a == b.
    diff2 = aa + bb - 2.0 * ab
    lam = torch.where(diff2 > 0, ((bb - ab) / torch.where(diff2 > 0, diff2, one)).clamp(0.0, 1.0), 0.5 * one)
    na, nb = aa.clamp_min(0).sqrt(), bb.clamp_min(0).sqrt()
    degenerate = (aa == 0) | (bb == 0)
    # cos < -margin <=> a.b < -margin ||a|| ||b|| when both norms are positive (margin 0: a.b < 0)
    conflict = ab < -spec.margin * (na * nb) if spec.margin > 0 else ab < 0  # margin 0: csrc/rule.h's plain test
    if spec.symmetric:
        imbalanced = torch.maximum(na, nb) * tau > torch.minimum(na, nb)  # max(r, 1/r) > 1/tau
    else:
        imbalanced = na > tau * nb  # the paper's literal r = ||a||/||b|| > tau
    # rescale the weaker of a, b to the stronger's norm
    safe_na, safe_nb = torch.where(na > 0, na, one), torch.where(nb > 0, nb, one)
    r_alpha = torch.where(na < nb, nb / safe_na, one)
    r_beta = torch.where(nb < na, na / safe_nb, one)

    live = ~degenerate
    if rule == "mgda":
        put(one.bool(), Case.PARETO, lam, 1.0 - lam)
        put(degenerate, Case.DEGENERATE, lam, 1.0 - lam)
    elif rule == "pareto_lora":
        put(live & imbalanced, Case.RESCALED, r_alpha, r_beta)
        put(live & conflict, Case.PARETO, lam, 1.0 - lam)
    elif rule == "pareto_only":
        put(live & conflict, Case.PARETO, lam, 1.0 - lam)
    elif rule == "rescale_only":
        put(live & imbalanced, Case.RESCALED, r_alpha, r_beta)
    elif rule == "mmpareto":
        h_a = torch.where(conflict, 2.0 * lam, one)
        h_b = torch.where(conflict, 2.0 * (1.0 - lam), one)
        h2 = h_a * h_a * aa + h_b * h_b * bb + 2.0 * h_a * h_b * ab
        reach = h_a * na + h_b * nb  # ||h|| <= reach; the statistics' error in h2 scales with reach^2
        moving = h2 > STATIONARY_REL * reach * reach
        sum2 = (aa + bb + 2.0 * ab).clamp_min(0)
        scale = gamma * sum2.sqrt() / torch.where(moving, h2, one).sqrt()
        put(live, Case.SUMMED, scale * h_a, scale * h_b)
        put(live & conflict, Case.PARETO, scale * h_a, scale * h_b)
        zero = torch.zeros_like(one)
        put(live & ~moving, Case.STATIONARY, zero, zero)
    # "sum": alpha = beta = 1
    if rule != "sum" and rule != "mgda":
        put(degenerate, Case.DEGENERATE, one, one)
    if rule in _GRAM_WEIGHTINGS:  # their own zero-norm handling (docs/rules.md): replaces the above
        alpha, beta, case = _gram_weighting(spec, aa, bb, ab, na, nb)
    if rule in _FAMILY_B:  # their own zero-norm handling (docs/rules.md): replaces the above
        alpha, beta, case = _family_b(spec, aa, bb, ab, na, nb)
    # A coefficient float32 cannot hold, or one whose scaled buffer could overflow float32, never
    # produces an inf: plain sum, NONFINITE (rules.term_fits).
    put(~(term_fits(alpha, na) & term_fits(beta, nb)), Case.NONFINITE, one, one)
    if active is not None:
        put(~active.to(dev), Case.INACTIVE, one, one)
    finite = torch.isfinite(s).all(dim=1)
    put(~finite | invalid, Case.NONFINITE, one, one)
    coeffs = torch.stack([alpha, beta], dim=1).to(coeff_dtype)
    return coeffs, case


_GRAM_WEIGHTINGS = ("mean", "constant", "upgrad", "pcgrad", "dualproj", "imtl_g")


def _gram_weighting(spec: RuleSpec, aa, bb, ab, na, nb):
    """(alpha, beta, case) of torchjd's weightings mean .. imtl_g on two rows, in closed form.

    Derivations in docs/rules.md. q_a = -a.b/(||a||^2 + reg) is the multiple of a that the dual-cone
    projection of b adds (q_b likewise); it is only formed where a.b < 0, which implies both norms are
    positive, and q_a ||a|| <= |a.b|/||a|| <= ||b||: nothing is divided by a norm that rounding made.
    """
    name = spec.name
    one = torch.ones_like(aa)
    weighted = torch.full(aa.shape, int(Case.WEIGHTED), dtype=torch.int32, device=aa.device)
    pareto = torch.full_like(weighted, int(Case.PARETO))
    if name == "mean":
        return 0.5 * one, 0.5 * one, weighted
    if name == "constant":
        return spec.weights[0] * one, spec.weights[1] * one, weighted
    if name == "imtl_g":
        # pinv(G) (||a||, ||b||) normalised to sum 1, at rank 2; at a zero norm the plain sum (which is
        # torchjd's output there: the other row) rather than the rank-2 limit 0.
        degenerate = (aa == 0) | (bb == 0)
        total = torch.where(degenerate, one, na + nb)
        code = torch.where(degenerate, torch.full_like(weighted, int(Case.DEGENERATE)), weighted)
        return torch.where(degenerate, one, nb / total), torch.where(degenerate, one, na / total), code
    conflict = ab < 0
    # torchjd regularises the trace-normalised Gram, G/tr G + reg_eps I: in unnormalised terms
    # ||a||^2 + reg_eps (||a||^2 + ||b||^2). pcgrad projects exactly.
    reg = 0.0 if name == "pcgrad" else spec.reg_eps * (aa + bb)
    q_a = torch.where(conflict, -ab / torch.where(conflict, aa + reg, one), 0.0 * one)
    q_b = torch.where(conflict, -ab / torch.where(conflict, bb + reg, one), 0.0 * one)
    if name == "pcgrad":  # sum of a projected off b and b projected off a
        return 1.0 + q_a, 1.0 + q_b, torch.where(conflict, pareto, torch.full_like(weighted, int(Case.SUMMED)))
    if name == "upgrad":  # mean of the two projected rows
        return 0.5 * (1.0 + q_a), 0.5 * (1.0 + q_b), torch.where(conflict, pareto, weighted)
    # dualproj: the mean weights (1/2, 1/2) raised to the nearest feasible ones; at most one moves
    moved = (q_a > 1.0) | (q_b > 1.0)
    return 0.5 * torch.maximum(q_a, one), 0.5 * torch.maximum(q_b, one), torch.where(moved, pareto, weighted)

_FAMILY_B = ("cagrad", "nash_mtl", "aligned_mtl", "config")


def _family_b(spec: RuleSpec, aa, bb, ab, na, nb):
    """(alpha, beta, case) of torchjd's CAGrad, NashMTL, AlignedMTL and ConFIG on two rows, in closed
    form (derivations and every difference from torchjd in docs/rules.md). A zero norm: torchjd's own
    output there (cagrad 0, nash_mtl the other row normalised, aligned_mtl the mean, config the sum),
    DEGENERATE. Nothing below divides by a quantity that rounding of the statistics can make."""
    name, one = spec.name, torch.ones_like(aa)
    zero = 0.0 * one
    degenerate = (aa == 0) | (bb == 0)
    code = torch.full(aa.shape, int(Case.WEIGHTED), dtype=torch.int32, device=aa.device)
    safe_na, safe_nb = torch.where(na > 0, na, one), torch.where(nb > 0, nb, one)
    cos = torch.where(degenerate, zero, ab / safe_na / safe_nb)  # in two divisions: na nb may overflow
    if name == "config":  # (||a|| + ||b||)/2 (a/||a|| + b/||b||)
        alpha, beta = 0.5 + 0.5 * nb / safe_na, 0.5 + 0.5 * na / safe_nb
        degenerate_ab = (one, one)
    elif name == "nash_mtl":  # G w = 1/w: w = (1/||a||, 1/||b||)/sqrt(1 + cos), ||out|| = sqrt 2, clipped
        limit = spec.max_norm if spec.max_norm > 0 else math.inf  # 0: no clipping
        h2 = 2.0 + 2.0 * cos  # ||a/||a|| + b/||b||||^2 <= 4: mmpareto's STATIONARY_REL test, reach 2
        moving = h2 > STATIONARY_REL * 4.0
        scale = min(math.sqrt(2.0), limit) / torch.where(moving, h2, one).sqrt()
        alpha, beta = torch.where(moving, scale / safe_na, zero), torch.where(moving, scale / safe_nb, zero)
        code = torch.where(moving, code, torch.full_like(code, int(Case.STATIONARY)))
        # One row: its Nash point w = 1/||a||, the unit vector, clipped (torchjd's output there).
        unit = min(1.0, limit)
        degenerate_ab = (torch.where(na > 0, unit / safe_na, zero), torch.where(nb > 0, unit / safe_nb, zero))
    else:  # cagrad, aligned_mtl: on the trace-normalised Gram (both are invariant to its scale)
        t = torch.where(degenerate, one, aa + bb)
        p, q, w = aa / t, bb / t, ab / t
        det = (p * q - w * w).clamp_min(0.0)
        if name == "aligned_mtl":
            alpha, beta, degenerate_ab = *_aligned_mtl(p, q, w, det, cos), (0.5 * one, 0.5 * one)
        else:
            alpha, beta, still = _cagrad(p, q, w, det, spec.c)
            code = torch.where(still, torch.full_like(code, int(Case.STATIONARY)), code)
            degenerate_ab = (zero, zero)
    alpha, beta = torch.where(degenerate, degenerate_ab[0], alpha), torch.where(degenerate, degenerate_ab[1], beta)
    return alpha, beta, torch.where(degenerate, torch.full_like(code, int(Case.DEGENERATE)), code)


def _aligned_mtl(p, q, w, det, cos):
    # Eigenvalues of G = [[p, w], [w, q]] (p + q = 1); l_minus = det/l_plus avoids the cancellation.
    r = (0.25 * (p - q) * (p - q) + w * w).sqrt()
    l_plus = 0.5 + r
    l_minus = det / l_plus
    # Rank 1 where |cos| is 1 within the statistics' rounding (CAUCHY_SCHWARZ_SLACK, as the validity
    # test): torchjd truncates to the top eigenvector v, B = v v^T = (G - l_minus I)/(l_plus - l_minus).
    rank1 = cos.abs() >= 1.0 - CAUCHY_SCHWARZ_SLACK
    gap = torch.where(rank1, 2.0 * r, torch.ones_like(r))
    # Rank 2: B = sqrt(l_minus) G^(-1/2); with G^(-1/2) = (G + d I)^(-1) (sqrt(l_plus) + sqrt(l_minus)),
    # d = sqrt(det), the 1/sqrt(l_minus) cancels: nothing is divided by the small eigenvalue.
    d = det.sqrt()
    den = 2.0 * l_plus.sqrt() * (l_plus.sqrt() + l_minus.sqrt())
    alpha = torch.where(rank1, (p + w - l_minus) / (2.0 * gap), (q - w + d) / den)
    beta = torch.where(rank1, (q + w - l_minus) / (2.0 * gap), (p - w + d) / den)
    return alpha, beta


def _cagrad(p, q, w, det, c):
    # min over x in [0, 1] of g_x.g0 + c ||g0|| ||g_x||, g_x = x a + (1 - x) b, g0 = (a + b)/2: the
    # root of its derivative in closed form (docs/rules.md), then d = g0 + c ||g0|| g_x/||g_x||.
    s = 0.5 * (p - q)
    diff2 = p + q - 2.0 * w  # ||a - b||^2
    k = c * (0.25 * (p + q + 2.0 * w)).clamp_min(0.0).sqrt()  # c ||g0||
    disc = k * k * diff2 - s * s
    inner = (diff2 > 0) & (disc > 0)
    one = torch.ones_like(p)
    safe_diff2 = torch.where(diff2 > 0, diff2, one)
    lam = ((q - w) / safe_diff2).clamp(0.0, 1.0)  # s = 0: the min-norm point (MGDA)
    u = -s * det.sqrt() / torch.where(inner, disc, one).sqrt()
    edge = torch.where(s > 0, 0.0 * one, torch.where(s < 0, one, lam))
    x = torch.where(inner, ((q - w + u) / safe_diff2).clamp(0.0, 1.0), edge)
    x = torch.where(diff2 > 0, x, 0.5 * one)
    gx2 = (x * x * p + 2.0 * x * (1.0 - x) * w + (1.0 - x) * (1.0 - x) * q).clamp_min(0.0)
    reach = x * p.sqrt() + (1.0 - x) * q.sqrt()
    # ||g_x|| = 0: Pareto-stationary, zero output. Below torchjd's norm_eps (relative to sqrt(tr G))
    # as torchjd, and where ||g_x|| is within the statistics' rounding (mmpareto's test).
    still = ~((gx2 >= CAGRAD_NORM_EPS * CAGRAD_NORM_EPS) & (gx2 > STATIONARY_REL * reach * reach))
    ratio = k / torch.where(still, one, gx2).sqrt()
    return torch.where(still, 0.0 * one, 0.5 + ratio * x), torch.where(still, 0.0 * one, 0.5 + ratio * (1.0 - x)), still


def combine(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    coeffs: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = alpha[s] * a + beta[s] * b on every segment s (computed in float64)."""
    offsets = _checks.as_offsets(offsets)
    _checks.check_combine(a, b, offsets, coeffs, out)
    res = combine_by_ids(a, b, segment_ids(offsets, a.device), coeffs)
    if out is None:
        return res.to(a.dtype).reshape(a.shape)
    out.reshape(-1).copy_(res)
    return out


def group_sums(stats: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[G, C] float64: row g = +0.0 + stats[groups[g]] + ... + stats[groups[g+1] - 1], left to right.

    The one summation order of group statistics on every backend and device (csrc/cpu/ops_cpu.cpp,
    the CUDA and Triton kernels add in the same order), so every path gives the same bits. An empty
    group gets zeros. Vectorised over groups, looping over the largest group's size (a few units).
    ``groups`` is a validated int64 [G+1] (any device).
    """
    s = stats.to(torch.float64)
    groups = groups.to(s.device)
    first, sizes = groups[:-1], groups[1:] - groups[:-1]
    acc = torch.zeros(first.numel(), s.shape[1], dtype=torch.float64, device=s.device)
    longest = int(sizes.max()) if sizes.numel() > 0 else 0
    for k in range(longest):
        take = (k < sizes)[:, None]
        # +0.0 where a group has no k-th segment: acc + 0.0 == acc, since acc starts at +0.0 and a
        # float64 sum that starts at +0.0 is never -0.0 (NaN and inf stay what they are).
        rows = s[torch.where(take[:, 0], first + k, 0)] if s.shape[0] > 0 else acc
        acc = acc + torch.where(take, rows, 0.0)
    return acc


def segment_groups(groups: torch.Tensor, num_segments: int) -> torch.Tensor:
    """The group of every segment (int64 [S]) of a validated ``groups`` [G+1]."""
    sizes = groups[1:] - groups[:-1]
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=groups.device), sizes, output_size=num_segments)


def integrate(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    spec: RuleSpec = DEFAULT_RULE,
    *,
    active: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    poison: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
) -> IntegrationResult:
    """stats (per segment) -> rule (per group) -> combine. Returns ``IntegrationResult``.

    The Backend protocol's signature: the rule is one RuleSpec (``pareto_lora.integrate(...,
    backend="reference")`` takes the loose keywords). ``active``, ``groups``, ``poison`` and
    ``stats`` are those of :func:`pareto_lora.integrate` (semantics in
    :mod:`pareto_lora.backends.protocol`).
    """
    _check_spec(spec)
    offsets, active, groups = _checks.as_offsets(offsets), _checks.as_active(active), _checks.as_groups(groups)
    num_segments, host_groups = _checks.check_integrate(a, b, offsets, out, active, groups, poison, stats)
    if stats is None:
        stats = stats_by_ids(a, b, segment_ids(offsets, a.device), num_segments)
    else:
        stats = stats.to(torch.float64, copy=True)  # returned as given, never aliased
    if host_groups is None:
        group_stats = stats + 0.0  # each segment its own group: +0.0 + its row
    else:
        group_stats = group_sums(stats, host_groups)
    # float64 inputs get float64 coefficients: the oracle of float64 training stays exact.
    coeffs, cases = _rule(group_stats, spec, active, torch.float64 if a.dtype == torch.float64 else torch.float32)
    seg_coeffs = coeffs if host_groups is None else coeffs[segment_groups(host_groups, num_segments).to(a.device)]
    if poison is not None:
        # NaN coefficients make the whole output NaN (a GradScaler skips the step); no host read.
        seg_coeffs = seg_coeffs * torch.where(poison, math.nan, 1.0).to(seg_coeffs.dtype)
        cases = torch.where(poison, torch.full_like(cases, int(Case.NONFINITE)), cases)
    out = combine(a, b, offsets, seg_coeffs, out)
    return IntegrationResult(out, stats, coeffs, cases, group_stats)

// The integration rules as one closed-form function of the three per-segment statistics.
// Shared by the CPU and CUDA kernels (host/device); python/pareto_lora/reference.py is the
// oracle it is tested against, python/pareto_lora/rules.py holds the same name table.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PL_HOST_DEVICE __host__ __device__
#else
#define PL_HOST_DEVICE
#endif

namespace pareto_lora {

enum class Rule : int32_t {
  Sum = 0,
  ParetoLoRA,
  ParetoOnly,
  RescaleOnly,
  Mgda,
  MMPareto,
  Mean = 6,
  Constant = 7,
  Upgrad = 8,
  Pcgrad = 9,
  Dualproj = 10,
  ImtlG = 11,
  Cagrad = 12,
  NashMtl = 13,
  AlignedMtl = 14,
  Config = 15,
  Count
};

enum Case : int32_t {
  kSummed = 0,
  kRescaled = 1,
  kPareto = 2,
  kInactive = 3,
  kDegenerate = 4,
  kNonFinite = 5,
  kStationary = 6,
  kWeighted = 7,
};

// Index = Rule id. Must match RULE_DOCS in python/pareto_lora/rules.py (tested).
constexpr const char* kRuleNames[] = {"sum", "pareto_lora", "pareto_only", "rescale_only", "mgda", "mmpareto",
                                      "mean", "constant", "upgrad", "pcgrad", "dualproj", "imtl_g",
                                      "cagrad", "nash_mtl", "aligned_mtl", "config"};

// The rule's parameters after its id, in the order the ops take them (schema `float[] params`).
// Must match KERNEL_PARAMS in python/pareto_lora/rules.py (tested); RuleParams' fields follow it.
constexpr const char* kParamNames[] = {"tau", "gamma", "symmetric", "margin", "c", "w_a", "w_b", "max_norm", "reg_eps"};
constexpr int kNumParams = sizeof(kParamNames) / sizeof(kParamNames[0]);

struct RuleParams {
  Rule rule = Rule::Sum;
  double tau = 0.5;
  double gamma = 1.0;
  bool symmetric = false;
  // Conflict only when cos < -margin (0 = the paper's cos < 0). Text and image gradients are
  // nearly orthogonal, so cos < 0 fires on noise about half the time; a margin ignores that.
  double margin = 0.0;
  double c = 0.4;         // cagrad
  double w_a = 1.0;       // constant: out = w_a a + w_b b
  double w_b = 1.0;
  double max_norm = 1.0;  // nash_mtl (0: no clipping)
  double reg_eps = 1e-4;  // upgrad, dualproj: ridge on the trace-normalised Gram (0: exact)
};

struct Coefficients {
  double alpha;
  double beta;
  int32_t code;
};

// Portable finiteness test (no std:: vs device overload issues): x - x is 0 for finite x
// and NaN for +-inf and NaN.
PL_HOST_DEVICE inline bool is_finite(double x) { return x - x == 0.0; }

// Bound on the relative error of the statistics the rule is given: the kernels sum exact
// products in double (error ~ n * 2^-53), and statistics summed elsewhere in float32 carry 2^-24
// per rounding; 2^-20 covers both with room. python/pareto_lora/rules.py holds the same numbers.
constexpr double kStatsRelErr = 0x1p-20;
// a.b may exceed ||a|| ||b|| by rounding only: beyond this factor the statistics are not valid.
constexpr double kCauchySchwarzSlack = 4.0 * kStatsRelErr;
// mmpareto: ||h||^2 <= kStationaryRel * (h_a ||a|| + h_b ||b||)^2 counts as Pareto-stationary.
// Above it, the statistics' error moves ||h||^2 by at most 1/16 of its value, so the output
// norm gamma ||a + b|| ||h_true|| / ||h_est|| is within sqrt(1 + 1/16) < 1.031 of gamma ||a + b||.
constexpr double kStationaryRel = 16.0 * kStatsRelErr;
// Coefficients are stored as float32: a larger one would be written as inf.
constexpr double kMaxCoefficient = 3.4028234663852886e38;
// cagrad: torchjd's norm_eps, relative to sqrt(||a||^2 + ||b||^2) (rules.py CAGRAD_NORM_EPS).
constexpr double kCagradNormEps = 1e-4;
// A coefficient above 1 scales its buffer up: |c| ||x|| bounds every |c x_i|, and the combine may
// form c x_i in float32, so a term beyond this is NONFINITE (plain sum) rather than an inf that
// the float64 reference would not produce. The margin covers the statistics' error and the
// coefficient's float32 rounding.
constexpr double kMaxTerm = kMaxCoefficient * (1.0 - 4.0 * kStatsRelErr);

// Whether coefficient c of a buffer with norm `norm` can be written and applied in float32.
PL_HOST_DEVICE inline bool term_fits(double c, double norm) {
  const double m = fabs(c);
  return m <= kMaxCoefficient && (m <= 1.0 || m * norm <= kMaxTerm);
}

// All arithmetic in double: the stats are float32 but the rule divides and takes square
// roots of them, and G is small, so the wider type costs nothing and keeps every backend's
// coefficients equal to the reference's to float32 rounding.
PL_HOST_DEVICE inline Coefficients rule_of_valid(double aa, double bb, double ab, const RuleParams& p);

// Precedence: statistics that are not finite or not valid (a negative squared norm, |a.b| above
// ||a|| ||b|| beyond rounding), then inactive, then the rule; a coefficient too large for float32,
// or one whose scaled buffer could overflow float32 (term_fits), is reported as NONFINITE too
// (plain sum) rather than producing an inf.
PL_HOST_DEVICE inline Coefficients compute_rule(double aa, double bb, double ab, bool active, const RuleParams& p) {
  if (!(is_finite(aa) && is_finite(bb) && is_finite(ab))) return {1.0, 1.0, kNonFinite};
  if (aa < 0.0 || bb < 0.0) return {1.0, 1.0, kNonFinite};
  const double bound = sqrt(aa) * sqrt(bb);
  if (fabs(ab) > bound * (1.0 + kCauchySchwarzSlack)) return {1.0, 1.0, kNonFinite};
  ab = fmin(fmax(ab, -bound), bound);  // within rounding: the nearest valid value
  if (!active) return {1.0, 1.0, kInactive};
  const Coefficients c = rule_of_valid(aa, bb, ab, p);
  if (!(term_fits(c.alpha, sqrt(aa)) && term_fits(c.beta, sqrt(bb)))) return {1.0, 1.0, kNonFinite};
  return c;
}

// torchjd's weightings mean .. imtl_g on two rows, in closed form (docs/rules.md derives them;
// python/pareto_lora/reference.py _gram_weighting is the oracle). q_a = -a.b/(||a||^2 + reg) is the
// multiple of a that the dual-cone projection of b adds; it is only formed where a.b < 0 (so both
// norms are positive), and q_a ||a|| <= ||b||: nothing is divided by a norm made of rounding.
PL_HOST_DEVICE inline Coefficients gram_weighting(double aa, double bb, double ab, const RuleParams& p) {
  if (p.rule == Rule::Mean) return {0.5, 0.5, kWeighted};
  if (p.rule == Rule::Constant) return {p.w_a, p.w_b, kWeighted};
  if (p.rule == Rule::ImtlG) {
    // pinv(G) (||a||, ||b||) normalised at rank 2; a zero norm: the plain sum (torchjd's output there).
    if (aa == 0.0 || bb == 0.0) return {1.0, 1.0, kDegenerate};
    const double na = sqrt(aa), nb = sqrt(bb);
    return {nb / (na + nb), na / (na + nb), kWeighted};
  }
  const bool conflict = ab < 0.0;
  // torchjd regularises G/tr G + reg_eps I; unnormalised: ||a||^2 + reg_eps (||a||^2 + ||b||^2).
  const double reg = p.rule == Rule::Pcgrad ? 0.0 : p.reg_eps * (aa + bb);
  const double qa = conflict ? -ab / (aa + reg) : 0.0;
  const double qb = conflict ? -ab / (bb + reg) : 0.0;
  if (p.rule == Rule::Pcgrad) return {1.0 + qa, 1.0 + qb, conflict ? kPareto : kSummed};
  if (p.rule == Rule::Upgrad) return {0.5 * (1.0 + qa), 0.5 * (1.0 + qb), conflict ? kPareto : kWeighted};
  // Dualproj: the mean weights raised to the nearest feasible ones; at most one of them moves.
  const bool moved = qa > 1.0 || qb > 1.0;
  return {0.5 * fmax(qa, 1.0), 0.5 * fmax(qb, 1.0), moved ? kPareto : kWeighted};
}

// torchjd's AlignedMTL on the trace-normalised Gram [[pa, w], [w, pb]] (pa + pb = 1; invariant to
// its scale). Rank 2: B = sqrt(l-) G^(-1/2) with G^(-1/2) = (G + d I)^(-1) (sqrt(l+) + sqrt(l-)),
// d = sqrt(det): the 1/sqrt(l-) cancels, nothing is divided by the small eigenvalue. Rank 1 where
// |cos| is 1 within the statistics' rounding (kCauchySchwarzSlack): torchjd's truncation to the top
// eigenvector, B = v v^T = (G - l- I)/(l+ - l-).
PL_HOST_DEVICE inline Coefficients aligned_mtl(double pa, double pb, double w, double det, double cos) {
  const double r = sqrt(0.25 * (pa - pb) * (pa - pb) + w * w);
  const double l_plus = 0.5 + r;
  const double l_minus = det / l_plus;  // not 0.5 - r: no cancellation
  if (fabs(cos) >= 1.0 - kCauchySchwarzSlack) {
    const double gap = 2.0 * r;
    return {(pa + w - l_minus) / (2.0 * gap), (pb + w - l_minus) / (2.0 * gap), kWeighted};
  }
  const double d = sqrt(det);
  const double den = 2.0 * sqrt(l_plus) * (sqrt(l_plus) + sqrt(l_minus));
  return {(pb - w + d) / den, (pa - w + d) / den, kWeighted};
}

// CAGrad: x in [0, 1] minimises g_x.g0 + c ||g0|| ||g_x|| (g_x = x a + (1 - x) b, g0 = (a + b)/2) on
// the trace-normalised Gram; the root of its derivative in closed form (docs/rules.md), then
// out = g0 + c ||g0|| g_x/||g_x||. ||g_x|| below torchjd's norm_eps, or within the statistics'
// rounding (mmpareto's kStationaryRel test), is Pareto-stationary: zero output, as torchjd.
PL_HOST_DEVICE inline Coefficients cagrad(double pa, double pb, double w, double det, double c) {
  const double s = 0.5 * (pa - pb);
  const double diff2 = pa + pb - 2.0 * w;  // ||a - b||^2
  const double k = c * sqrt(fmax(0.25 * (pa + pb + 2.0 * w), 0.0));  // c ||g0||
  const double disc = k * k * diff2 - s * s;
  double x = 0.5;  // a = b: every x gives the same point
  if (diff2 > 0.0) {
    const double lam = fmin(fmax((pb - w) / diff2, 0.0), 1.0);  // s = 0: the min-norm point
    if (disc > 0.0) {
      const double u = -s * sqrt(det) / sqrt(disc);
      x = fmin(fmax((pb - w + u) / diff2, 0.0), 1.0);
    } else {
      x = s > 0.0 ? 0.0 : (s < 0.0 ? 1.0 : lam);
    }
  }
  const double gx2 = fmax(x * x * pa + 2.0 * x * (1.0 - x) * w + (1.0 - x) * (1.0 - x) * pb, 0.0);
  const double reach = x * sqrt(pa) + (1.0 - x) * sqrt(pb);
  if (!(gx2 >= kCagradNormEps * kCagradNormEps && gx2 > kStationaryRel * reach * reach)) return {0.0, 0.0, kStationary};
  const double ratio = k / sqrt(gx2);
  return {0.5 + ratio * x, 0.5 + ratio * (1.0 - x), kWeighted};
}

// cagrad, nash_mtl, aligned_mtl and config: torchjd's aggregators on two rows in closed form
// (docs/rules.md; python/pareto_lora/reference.py _family_b is the oracle). A zero norm gives
// torchjd's own output there, DEGENERATE: cagrad 0, nash_mtl the other row normalised (and
// clipped), aligned_mtl the mean, config the sum.
PL_HOST_DEVICE inline Coefficients family_b(double aa, double bb, double ab, const RuleParams& p) {
  const double na = sqrt(aa), nb = sqrt(bb);
  const double limit = p.max_norm > 0.0 ? p.max_norm : INFINITY;  // nash_mtl; 0: no clipping
  if (aa == 0.0 || bb == 0.0) {
    switch (p.rule) {
      case Rule::Cagrad: return {0.0, 0.0, kDegenerate};
      case Rule::NashMtl: {
        const double unit = fmin(1.0, limit);
        return {na > 0.0 ? unit / na : 0.0, nb > 0.0 ? unit / nb : 0.0, kDegenerate};
      }
      case Rule::AlignedMtl: return {0.5, 0.5, kDegenerate};
      default: return {1.0, 1.0, kDegenerate};
    }
  }
  const double cos = ab / na / nb;  // in two divisions: na * nb may overflow
  if (p.rule == Rule::Config) return {0.5 + 0.5 * nb / na, 0.5 + 0.5 * na / nb, kWeighted};
  if (p.rule == Rule::NashMtl) {
    // G w = 1/w: w = (1/||a||, 1/||b||)/sqrt(1 + cos), ||out|| = sqrt 2, then clipped to max_norm.
    const double h2 = 2.0 + 2.0 * cos;  // ||a/||a|| + b/||b||||^2 <= 4 (mmpareto's test, reach 2)
    if (!(h2 > kStationaryRel * 4.0)) return {0.0, 0.0, kStationary};
    const double scale = fmin(sqrt(2.0), limit) / sqrt(h2);
    return {scale / na, scale / nb, kWeighted};
  }
  const double t = aa + bb;
  const double pa = aa / t, pb = bb / t, w = ab / t;
  const double det = fmax(pa * pb - w * w, 0.0);
  if (p.rule == Rule::AlignedMtl) return aligned_mtl(pa, pb, w, det, cos);
  return cagrad(pa, pb, w, det, p.c);
}

PL_HOST_DEVICE inline Coefficients rule_of_valid(double aa, double bb, double ab, const RuleParams& p) {
  if (p.rule == Rule::Sum) return {1.0, 1.0, kSummed};
  if (p.rule >= Rule::Mean && p.rule <= Rule::ImtlG) return gram_weighting(aa, bb, ab, p);
  if (p.rule >= Rule::Cagrad && p.rule <= Rule::Config) return family_b(aa, bb, ab, p);

  // MGDA: lambda minimises ||lambda a + (1 - lambda) b||^2 on [0, 1]. The paper's Eq. 4
  // prints the weight of b under this name; this is the minimiser of its Eq. 3.
  const double diff2 = aa + bb - 2.0 * ab;
  double lam = 0.5;
  if (diff2 > 0.0) lam = fmin(fmax((bb - ab) / diff2, 0.0), 1.0);

  const bool degenerate = aa == 0.0 || bb == 0.0;
  if (p.rule == Rule::Mgda) return {lam, 1.0 - lam, degenerate ? kDegenerate : kPareto};
  // Nothing is rescaled by, or normalised with, a zero norm.
  if (degenerate) return {1.0, 1.0, kDegenerate};

  const double na = sqrt(aa), nb = sqrt(bb);
  // cos < -margin with both norms positive. margin 0 keeps the plain ab < 0 (bitwise today's
  // behaviour, also where na * nb overflows to inf and 0 * inf would be NaN).
  const bool conflict = p.margin > 0.0 ? ab < -p.margin * (na * nb) : ab < 0.0;
  // Literal reading of the paper: r = ||a||/||b|| > tau. symmetric: max(r, 1/r) > 1/tau.
  const bool imbalanced = p.symmetric ? fmax(na, nb) * p.tau > fmin(na, nb) : na > p.tau * nb;
  const double ra = na < nb ? nb / na : 1.0;  // rescale the weaker to the stronger's norm
  const double rb = nb < na ? na / nb : 1.0;

  switch (p.rule) {
    case Rule::ParetoLoRA:
      if (conflict) return {lam, 1.0 - lam, kPareto};
      if (imbalanced) return {ra, rb, kRescaled};
      return {1.0, 1.0, kSummed};
    case Rule::ParetoOnly:
      if (conflict) return {lam, 1.0 - lam, kPareto};
      return {1.0, 1.0, kSummed};
    case Rule::RescaleOnly:
      if (imbalanced) return {ra, rb, kRescaled};
      return {1.0, 1.0, kSummed};
    case Rule::MMPareto: {
      const double ha = conflict ? 2.0 * lam : 1.0;
      const double hb = conflict ? 2.0 * (1.0 - lam) : 1.0;
      const double h2 = ha * ha * aa + hb * hb * bb + 2.0 * ha * hb * ab;
      const double reach = ha * na + hb * nb;  // ||h|| <= reach; errors in h2 scale with reach^2
      if (!(h2 > kStationaryRel * reach * reach)) return {0.0, 0.0, kStationary};
      const double scale = p.gamma * sqrt(fmax(aa + bb + 2.0 * ab, 0.0)) / sqrt(h2);
      return {scale * ha, scale * hb, conflict ? kPareto : kSummed};
    }
    default:
      return {1.0, 1.0, kSummed};
  }
}

}  // namespace pareto_lora

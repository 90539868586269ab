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

enum class Rule : int32_t { Sum = 0, ParetoLoRA, ParetoOnly, RescaleOnly, Mgda, MMPareto, Count };

enum Case : int32_t {
  kSummed = 0,
  kRescaled = 1,
  kPareto = 2,
  kInactive = 3,
  kDegenerate = 4,
  kNonFinite = 5,
  kStationary = 6,
};

// Index = Rule id. Must match RULE_DOCS in python/pareto_lora/rules.py (tested).
constexpr const char* kRuleNames[] = {"sum", "pareto_lora", "pareto_only", "rescale_only", "mgda", "mmpareto"};

struct RuleParams {
  Rule rule;
  double tau;
  double gamma;
  bool symmetric;
};

struct Coefficients {
  double alpha;
  double beta;
  int32_t code;
};

// Portable finiteness test (no std:: vs device overload issues): x - x is 0 for finite x
// and NaN for +-inf and NaN.
PL_HOST_DEVICE inline bool is_finite(double x) { return x - x == 0.0; }

// All arithmetic in double: the stats are float32 but the rule divides and takes square
// roots of them, and G is small, so the wider type costs nothing and keeps every backend's
// coefficients equal to the reference's to float32 rounding.
PL_HOST_DEVICE inline Coefficients compute_rule(double aa, double bb, double ab, bool active, const RuleParams& p) {
  if (!(is_finite(aa) && is_finite(bb) && is_finite(ab))) return {1.0, 1.0, kNonFinite};
  if (!active) return {1.0, 1.0, kInactive};
  if (p.rule == Rule::Sum) return {1.0, 1.0, kSummed};

  // MGDA: lambda minimises ||lambda a + (1 - lambda) b||^2 on [0, 1]. The paper's Eq. 4
  // prints the weight of b under this name; this is the minimiser of its Eq. 3.
  const double diff2 = aa + bb - 2.0 * ab;
  double lam = 0.5;
  if (diff2 > 0.0) lam = fmin(fmax((bb - ab) / diff2, 0.0), 1.0);

  const bool degenerate = aa == 0.0 || bb == 0.0;
  if (p.rule == Rule::Mgda) return {lam, 1.0 - lam, degenerate ? kDegenerate : kPareto};
  // Nothing is rescaled by, or normalised with, a zero norm.
  if (degenerate) return {1.0, 1.0, kDegenerate};

  const bool conflict = ab < 0.0;  // cos < 0 with both norms positive
  const double na = sqrt(aa), nb = sqrt(bb);
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
      if (!(h2 > 0.0)) return {0.0, 0.0, kStationary};
      const double scale = p.gamma * sqrt(fmax(aa + bb + 2.0 * ab, 0.0)) / sqrt(h2);
      return {scale * ha, scale * hb, conflict ? kPareto : kSummed};
    }
    default:
      return {1.0, 1.0, kSummed};
  }
}

}  // namespace pareto_lora

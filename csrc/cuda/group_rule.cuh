// The grouped training step's rule on the GPU (csrc/cuda/ops_cuda.cu, integrate_grouped): group
// sums, the rule, poison and the per-segment coefficients the combine applies.
#pragma once

#include <cstdint>

#include "../rule.h"

namespace pareto_lora {
namespace cuda_kernel {

// The grouped training step's rule (integrate with groups / poison / given stats): group g is
// segments groups[g] .. groups[g+1]-1, its statistics the rows summed left to right from +0.0
// (reference.group_sums: the same bits as the CPU op). Runs in the last block out of the
// statistics launch (or alone, as group_rule_kernel), so the combine is the second launch.
struct GroupJob {
  const int64_t* groups = nullptr;  // [G+1] on the device; null: no group epilogue
  int64_t num_groups = 0;
  const bool* poison = nullptr;  // 0-d on the device, or null
  const bool* active = nullptr;  // [G] on the device, or null
  RuleParams rule{Rule::Sum, 0.5, 1.0, false, 0.0};
  double* group_stats = nullptr;  // [G, 3]
  float* coeffs = nullptr;        // [G, 2]: the rule's own
  int32_t* cases = nullptr;       // [G]
  float* seg_coeffs = nullptr;    // [S, 2]: what the combine applies (NaN when poisoned)
};

// Threads of one block take groups in turn; each adds its group's rows in order. `stats` was
// written by other blocks of the same launch: read through volatile (not a stale L1 line).
__device__ inline void group_rules(const GroupJob& j, const double* stats) {
  const volatile double* st = stats;
  const bool poisoned = j.poison != nullptr && *j.poison;
  for (int64_t g = threadIdx.x; g < j.num_groups; g += blockDim.x) {
    double aa = 0.0, bb = 0.0, ab = 0.0;
    for (int64_t s = j.groups[g]; s < j.groups[g + 1]; ++s) {
      aa += st[3 * s];
      bb += st[3 * s + 1];
      ab += st[3 * s + 2];
    }
    j.group_stats[3 * g] = aa;
    j.group_stats[3 * g + 1] = bb;
    j.group_stats[3 * g + 2] = ab;
    const Coefficients c = compute_rule(aa, bb, ab, j.active == nullptr || j.active[g], j.rule);
    const float alpha = static_cast<float>(c.alpha), beta = static_cast<float>(c.beta);
    j.coeffs[2 * g] = alpha;
    j.coeffs[2 * g + 1] = beta;
    j.cases[g] = poisoned ? kNonFinite : c.code;
    // NaN coefficients make the whole output NaN (a GradScaler skips the step), read on the device.
    const float nan = __int_as_float(0x7fc00000);
    for (int64_t s = j.groups[g]; s < j.groups[g + 1]; ++s) {
      j.seg_coeffs[2 * s] = poisoned ? nan : alpha;
      j.seg_coeffs[2 * s + 1] = poisoned ? nan : beta;
    }
  }
}

// One block (integrate with given statistics: there is no statistics launch to finish in).
__global__ void group_rule_kernel(const GroupJob j, const double* stats) {
  group_rules(j, stats);
}

}  // namespace cuda_kernel
}  // namespace pareto_lora

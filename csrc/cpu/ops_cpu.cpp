// CPU implementations of the pareto_lora ops: validate everything (op_args.h), then stats -> rule -> combine.
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "../op_args.h"
#include "../rule.h"
#include "segment_kernels.h"

namespace pareto_lora {
namespace {

at::Tensor segment_stats(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  const SegmentArgs args = checked_stats_args(a, b, offsets, kCpuOp);
  at::Tensor stats = at::empty({args.num_segments, 3}, a.options().dtype(at::kDouble));
  segment_stats_cpu(a, b, args.offsets_ptr(), args.num_segments, stats.mutable_data_ptr<double>());
  return stats;
}

// The rule over G segments on the host (G is small: a loop is the right tool). `active` is
// contiguous or undefined.
std::tuple<at::Tensor, at::Tensor> rules_host(const at::Tensor& stats, const at::Tensor& active, const RuleParams& p) {
  const int64_t g = stats.size(0);
  const at::Tensor s = stats.to(at::kDouble).contiguous();
  at::Tensor coeffs = at::empty({g, 2}, stats.options().dtype(at::kFloat));
  at::Tensor cases = at::empty({g}, stats.options().dtype(at::kInt));
  const double* ps = s.const_data_ptr<double>();
  const bool* pa = active.defined() ? active.const_data_ptr<bool>() : nullptr;
  float* pc = coeffs.mutable_data_ptr<float>();
  int32_t* pk = cases.mutable_data_ptr<int32_t>();
  for (int64_t i = 0; i < g; ++i) {
    const Coefficients c = compute_rule(ps[3 * i], ps[3 * i + 1], ps[3 * i + 2], pa ? pa[i] : true, p);
    pc[2 * i] = static_cast<float>(c.alpha);
    pc[2 * i + 1] = static_cast<float>(c.beta);
    pk[i] = c.code;
  }
  return {coeffs, cases};
}

std::tuple<at::Tensor, at::Tensor> rule_coefficients(const at::Tensor& stats, c10::string_view rule, c10::ArrayRef<double> params,
                                                     const std::optional<at::Tensor>& active) {
  const RuleArgs args = checked_rule_args(stats, rule, params, active, kCpuOp);
  return rules_host(stats, args.active, args.rule);
}

void combine(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, const at::Tensor& coeffs,
             at::Tensor out) {
  const SegmentArgs args = checked_combine(a, b, offsets, coeffs, out, kCpuOp);
  const at::Tensor c = coeffs.to(at::kDouble).contiguous();
  combine_cpu(a, b, args.offsets_ptr(), args.num_segments, c.const_data_ptr<double>(), out);
}

// Returns (stats [S, 3], group_stats [G, 3], coeffs [G, 2], cases [G]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> integrate(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, at::Tensor out, c10::string_view rule,
    c10::ArrayRef<double> params, const std::optional<at::Tensor>& active,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& poison,
    const std::optional<at::Tensor>& given_stats) {
  const IntegrateArgs args = checked_integrate(a, b, offsets, out, rule, params, active, groups,
                                               poison, given_stats, kCpuOp);
  // Everything is checked: from here on writes may happen.
  const int64_t s = args.num_segments, g = args.num_groups;
  at::Tensor stats = at::empty({s, 3}, a.options().dtype(at::kDouble));
  at::Tensor group_stats = at::empty({g, 3}, a.options().dtype(at::kDouble));
  at::Tensor coeffs = at::empty({g, 2}, a.options().dtype(at::kFloat));
  at::Tensor cases = at::empty({g}, a.options().dtype(at::kInt));
  const bool* pa = args.active.defined() ? args.active.const_data_ptr<bool>() : nullptr;
  // On the CPU the host reads poison directly (it is a CPU tensor: no device to wait for).
  const bool poisoned = args.poison.defined() && args.poison.item<bool>();
  float* pc = coeffs.mutable_data_ptr<float>();
  int32_t* pk = cases.mutable_data_ptr<int32_t>();
  // The same arithmetic as rules_host, one group at a time (integrate_cpu calls it as soon as a
  // group's statistics are complete): the combine uses the float32 coefficients, widened, or NaN
  // when poisoned (the whole output NaN, so a GradScaler skips the step; coeffs stay the rule's).
  const GroupRule group_rule = [&](int64_t i, const double* st) {
    const Coefficients c = compute_rule(st[0], st[1], st[2], pa ? pa[i] : true, args.rule);
    pc[2 * i] = static_cast<float>(c.alpha);
    pc[2 * i + 1] = static_cast<float>(c.beta);
    pk[i] = poisoned ? kNonFinite : c.code;
    if (poisoned) return std::pair<double, double>(std::nan(""), std::nan(""));
    return std::pair<double, double>(pc[2 * i], pc[2 * i + 1]);
  };
  const double* given = args.stats.defined() ? args.stats.const_data_ptr<double>() : nullptr;
  integrate_cpu(a, b, args.offsets_ptr(), s, Grouping{args.groups_ptr(), g}, given, stats.mutable_data_ptr<double>(),
                group_stats.mutable_data_ptr<double>(), group_rule, out);
  return {stats, group_stats, coeffs, cases};
}

}  // namespace

TORCH_LIBRARY_IMPL(pareto_lora, CPU, m) {
  m.impl("segment_stats", &segment_stats);
  m.impl("rule_coefficients", &rule_coefficients);
  m.impl("combine", &combine);
  m.impl("integrate", &integrate);
}

}  // namespace pareto_lora

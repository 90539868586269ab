// CPU implementations of the pareto_lora ops: validate everything, then stats -> rule -> combine.
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>
#include <vector>

#include "../rule.h"
#include "../validate.h"
#include "segment_kernels.h"

namespace pareto_lora {
namespace {

at::Tensor segment_stats(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  const at::Tensor off = checked_offsets(a, b, offsets);
  const int64_t g = off.numel() - 1;
  at::Tensor stats = at::empty({g, 3}, a.options().dtype(at::kFloat));
  segment_stats_cpu(a, b, off.const_data_ptr<int64_t>(), g, stats.mutable_data_ptr<float>());
  return stats;
}

// The rule over G segments on the host (G is small: a loop is the right tool).
std::tuple<at::Tensor, at::Tensor> rules_host(const at::Tensor& stats, const std::optional<at::Tensor>& active,
                                              const RuleParams& p) {
  const int64_t g = stats.size(0);
  const at::Tensor s = stats.to(at::kDouble).contiguous();
  const at::Tensor act = active.has_value() ? active->contiguous() : at::Tensor();
  at::Tensor coeffs = at::empty({g, 2}, stats.options().dtype(at::kFloat));
  at::Tensor cases = at::empty({g}, stats.options().dtype(at::kInt));
  const double* ps = s.const_data_ptr<double>();
  const bool* pa = act.defined() ? act.const_data_ptr<bool>() : nullptr;
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

std::tuple<at::Tensor, at::Tensor> rule_coefficients(const at::Tensor& stats, c10::string_view rule, double tau,
                                                     const std::optional<at::Tensor>& active, double gamma,
                                                     bool symmetric) {
  const int64_t g = check_stats(stats);
  check_active(active, g);
  const RuleParams p = parse_rule_params(std::string(rule), tau, gamma, symmetric);
  return rules_host(stats, active.has_value() ? std::optional<at::Tensor>(active->cpu()) : std::nullopt, p);
}

void combine(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, const at::Tensor& coeffs,
             at::Tensor out) {
  const at::Tensor off = checked_offsets(a, b, offsets);
  const int64_t g = off.numel() - 1;
  check_coeffs(coeffs, g, a.device());
  check_out(out, a);
  const at::Tensor c = coeffs.to(at::kDouble).contiguous();
  combine_cpu(a, b, off.const_data_ptr<int64_t>(), g, c.const_data_ptr<double>(), out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> integrate(const at::Tensor& a, const at::Tensor& b,
                                                         const at::Tensor& offsets, at::Tensor out,
                                                         c10::string_view rule, double tau,
                                                         const std::optional<at::Tensor>& active, double gamma,
                                                         bool symmetric) {
  const at::Tensor off = checked_offsets(a, b, offsets);
  const int64_t g = off.numel() - 1;
  check_out(out, a);
  check_active(active, g);
  const RuleParams p = parse_rule_params(std::string(rule), tau, gamma, symmetric);
  // Everything is checked: from here on writes may happen.
  at::Tensor stats = at::empty({g, 3}, a.options().dtype(at::kFloat));
  segment_stats_cpu(a, b, off.const_data_ptr<int64_t>(), g, stats.mutable_data_ptr<float>());
  auto [coeffs, cases] = rules_host(stats, active.has_value() ? std::optional<at::Tensor>(active->cpu()) : std::nullopt, p);
  const at::Tensor c = coeffs.to(at::kDouble);
  combine_cpu(a, b, off.const_data_ptr<int64_t>(), g, c.const_data_ptr<double>(), out);
  return {stats, coeffs, cases};
}

}  // namespace

TORCH_LIBRARY_IMPL(pareto_lora, CPU, m) {
  m.impl("segment_stats", &segment_stats);
  m.impl("rule_coefficients", &rule_coefficients);
  m.impl("combine", &combine);
  m.impl("integrate", &integrate);
}

}  // namespace pareto_lora

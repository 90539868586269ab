// Argument checks shared by every compiled backend. Each raises a Python ValueError naming the
// argument and what was expected, and runs before any output is written.
// The messages match python/pareto_lora/checks.py (used by every backend's Python entry point).
#pragma once

#include <torch/types.h>

#include <cctype>
#include <cmath>
#include <cstring>
#include <string>

#include "rule.h"

namespace pareto_lora {

// The dtype as every message spells it, here and in Python ("float32", "int64"), not c10's "Float".
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kUInt16: return "uint16";
    case at::kUInt32: return "uint32";
    case at::kUInt64: return "uint64";
    case at::kComplexHalf: return "complex32";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    case at::kFloat8_e5m2: return "float8_e5m2";
    case at::kFloat8_e4m3fnuz: return "float8_e4m3fnuz";
    case at::kFloat8_e5m2fnuz: return "float8_e5m2fnuz";
    case at::kQInt8: return "qint8";
    case at::kQUInt8: return "quint8";
    case at::kQInt32: return "qint32";
    default: {
      // A type added later: c10's name in lower case is at least not a different spelling style.
      std::string s = c10::toString(t);
      for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return s;
    }
  }
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_buffers(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(is_supported_float(a.scalar_type()),
                    "a: expected dtype float32, bfloat16, float16 or float64, got ", dtype_name(a.scalar_type()));
  TORCH_CHECK_VALUE(is_supported_float(b.scalar_type()),
                    "b: expected dtype float32, bfloat16, float16 or float64, got ", dtype_name(b.scalar_type()));
  TORCH_CHECK_VALUE(a.is_contiguous(), "a: expected a contiguous tensor (flat gradient buffer)");
  TORCH_CHECK_VALUE(b.is_contiguous(), "b: expected a contiguous tensor (flat gradient buffer)");
  TORCH_CHECK_VALUE(b.numel() == a.numel(), "b: expected numel ", a.numel(), " (same as a), got ", b.numel());
  TORCH_CHECK_VALUE(b.scalar_type() == a.scalar_type(), "b: expected dtype ", dtype_name(a.scalar_type()),
                    " (same as a), got ", dtype_name(b.scalar_type()));
  TORCH_CHECK_VALUE(b.device() == a.device(), "b: expected device ", a.device(), " (same as a), got ", b.device());
}

inline void check_out(const at::Tensor& out, const at::Tensor& a) {
  TORCH_CHECK_VALUE(out.numel() == a.numel(), "out: expected numel ", a.numel(), " (same as a), got ", out.numel());
  TORCH_CHECK_VALUE(out.scalar_type() == a.scalar_type(), "out: expected dtype ", dtype_name(a.scalar_type()),
                    " (same as a), got ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.device() == a.device(), "out: expected device ", a.device(), " (same as a), got ",
                    out.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: expected a contiguous tensor");
  // The op writes into out without recording a graph: autograd would silently miss the write.
  TORCH_CHECK_VALUE(!out.requires_grad(), "out: expected a tensor that does not require grad (the op writes into it "
                    "outside autograd); pass out.detach() or a gradient buffer");
}

// Checks the values of a CPU int64 offsets tensor of length G+1 >= 1.
inline void check_offset_values(const int64_t* o, int64_t len, int64_t numel) {
  TORCH_CHECK_VALUE(o[0] == 0, "offsets: expected offsets[0] == 0, got ", o[0]);
  TORCH_CHECK_VALUE(o[len - 1] == numel, "offsets: expected offsets[-1] == numel == ", numel, ", got ",
                    o[len - 1]);
  for (int64_t i = 1; i < len; ++i) {
    TORCH_CHECK_VALUE(o[i] >= o[i - 1], "offsets: expected non-decreasing values, but offsets[", i,
                      "] < offsets[", i - 1, "]");
  }
}

// t (offsets, active) may live on the CPU, where the host reads it, or on `device`.
inline void check_host_or(const at::Tensor& t, const char* name, const at::Device& device) {
  if (device.is_cpu()) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected device cpu, got ", t.device());
  } else {
    TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == device, name, ": expected device cpu or ", device,
                      ", got ", t.device());
  }
}

// Checks the offsets' metadata; offsets may live on the CPU or on `device`. Returns G.
inline int64_t check_offsets_meta(const at::Tensor& offsets, const at::Device& device) {
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, "offsets: expected dtype int64, got ",
                    dtype_name(offsets.scalar_type()));
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1,
                    "offsets: expected a 1-D tensor of length G+1 >= 1, got shape ", offsets.sizes());
  check_host_or(offsets, "offsets", device);
  return offsets.numel() - 1;
}

// Validates the offsets (metadata and values) against a checked `a` and returns them on the CPU,
// where every backend reads them (CUDA builds its tile schedule there). Offsets on a GPU cost one
// blocking copy (a host sync); callers that care pass them on the CPU.
inline at::Tensor checked_offsets(const at::Tensor& a, const at::Tensor& offsets) {
  check_offsets_meta(offsets, a.device());
  at::Tensor cpu = offsets.is_cpu() ? offsets.contiguous() : offsets.to(at::kCPU).contiguous();
  check_offset_values(cpu.const_data_ptr<int64_t>(), cpu.numel(), a.numel());
  return cpu;
}

// One bool per segment, or per group in a grouped call (per = "group").
inline void check_active(const std::optional<at::Tensor>& active, int64_t num_segments,
                         const char* per = "segment") {
  if (!active.has_value()) return;
  const at::Tensor& t = *active;
  TORCH_CHECK_VALUE(t.scalar_type() == at::kBool, "active: expected dtype bool, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == num_segments, "active: expected shape [", num_segments,
                    "] (one per ", per, "), got ", t.sizes());
}

inline int64_t check_stats(const at::Tensor& stats) {
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble,
                    "stats: expected dtype float32 or float64, got ", dtype_name(stats.scalar_type()));
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(1) == 3, "stats: expected shape [G, 3], got ", stats.sizes());
  return stats.size(0);
}

inline void check_coeffs(const at::Tensor& coeffs, int64_t num_segments, const at::Device& device) {
  TORCH_CHECK_VALUE(coeffs.scalar_type() == at::kFloat || coeffs.scalar_type() == at::kDouble,
                    "coeffs: expected dtype float32 or float64, got ", dtype_name(coeffs.scalar_type()));
  TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(0) == num_segments && coeffs.size(1) == 2,
                    "coeffs: expected shape [", num_segments, ", 2], got ", coeffs.sizes());
  TORCH_CHECK_VALUE(coeffs.device() == device, "coeffs: expected device ", device, " (same as a), got ",
                    coeffs.device());
}

// The fused op's training-step arguments (the messages of python/pareto_lora/checks.py).
// groups: int64 [G+1] on the CPU or `device`, groups[0] == 0, groups[-1] == S, non-decreasing.
// Returned on the CPU, where the host cuts the work by group; on a GPU that is one blocking copy.
inline at::Tensor checked_groups(const at::Tensor& groups, int64_t num_segments, const at::Device& device) {
  TORCH_CHECK_VALUE(groups.scalar_type() == at::kLong, "groups: expected dtype int64, got ",
                    dtype_name(groups.scalar_type()));
  TORCH_CHECK_VALUE(groups.dim() == 1 && groups.numel() >= 1,
                    "groups: expected a 1-D tensor of length G+1 >= 1, got shape ", groups.sizes());
  check_host_or(groups, "groups", device);
  at::Tensor cpu = groups.is_cpu() ? groups.contiguous() : groups.to(at::kCPU).contiguous();
  const int64_t* g = cpu.const_data_ptr<int64_t>();
  const int64_t len = cpu.numel();
  TORCH_CHECK_VALUE(g[0] == 0, "groups: expected groups[0] == 0, got ", g[0]);
  TORCH_CHECK_VALUE(g[len - 1] == num_segments, "groups: expected groups[-1] == number of segments == ",
                    num_segments, ", got ", g[len - 1]);
  for (int64_t i = 1; i < len; ++i) {
    TORCH_CHECK_VALUE(g[i] >= g[i - 1], "groups: expected non-decreasing values, but groups[", i, "] < groups[",
                      i - 1, "]");
  }
  return cpu;
}

// poison: a 0-d bool tensor on a's device (the kernels read it there: no host sync on a GPU).
inline void check_poison(const at::Tensor& poison, const at::Device& device) {
  TORCH_CHECK_VALUE(poison.scalar_type() == at::kBool, "poison: expected dtype bool, got ",
                    dtype_name(poison.scalar_type()));
  TORCH_CHECK_VALUE(poison.dim() == 0, "poison: expected a 0-d tensor, got shape ", poison.sizes());
  TORCH_CHECK_VALUE(poison.device() == device, "poison: expected device ", device, " (same as a), got ",
                    poison.device());
}

// stats given to the fused op: float64 [S, 3] on a's device, any stride.
inline void check_given_stats(const at::Tensor& stats, int64_t num_segments, const at::Device& device) {
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kDouble, "stats: expected dtype float64, got ",
                    dtype_name(stats.scalar_type()));
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == num_segments && stats.size(1) == 3,
                    "stats: expected shape [", num_segments, ", 3] (one row per segment), got ", stats.sizes());
  TORCH_CHECK_VALUE(stats.device() == device, "stats: expected device ", device, " (same as a), got ",
                    stats.device());
}

inline RuleParams parse_rule_params(const std::string& rule, c10::ArrayRef<double> params) {
  int32_t id = -1;
  for (int32_t i = 0; i < static_cast<int32_t>(Rule::Count); ++i) {
    if (rule == kRuleNames[i]) id = i;
  }
  if (id < 0) {
    std::string names;
    for (int32_t i = 0; i < static_cast<int32_t>(Rule::Count); ++i) names += (i ? ", " : "") + std::string(kRuleNames[i]);
    TORCH_CHECK_VALUE(false, "rule: unknown rule '", rule, "'; expected one of ", names);
  }
  if (static_cast<int64_t>(params.size()) != kNumParams) {
    std::string names;
    for (int i = 0; i < kNumParams; ++i) names += (i ? ", " : "") + std::string(kParamNames[i]);
    TORCH_CHECK_VALUE(false, "params: expected ", kNumParams, " values (", names, "), got ", params.size());
  }
  const double tau = params[0], gamma = params[1], symmetric = params[2], margin = params[3], c = params[4],
               w_a = params[5], w_b = params[6], max_norm = params[7], reg_eps = params[8];
  // The same domains as RuleSpec (python/pareto_lora/rules.py), for callers of torch.ops directly.
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau: expected a finite number > 0, got ", tau);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma > 0, "gamma: expected a finite number > 0, got ", gamma);
  TORCH_CHECK_VALUE(symmetric == 0.0 || symmetric == 1.0, "symmetric: expected 0 or 1, got ", symmetric);
  TORCH_CHECK_VALUE(margin >= 0.0 && margin <= 1.0, "margin: expected a number in [0, 1], got ", margin);
  TORCH_CHECK_VALUE(std::isfinite(c) && c >= 0, "c: expected a finite number >= 0, got ", c);
  TORCH_CHECK_VALUE(std::isfinite(w_a) && w_a >= 0 && std::isfinite(w_b) && w_b >= 0 && (w_a > 0 || w_b > 0),
                    "weights: expected a pair (w_a, w_b) of finite numbers >= 0, not both 0, got (", w_a, ", ", w_b,
                    ")");
  TORCH_CHECK_VALUE(std::isfinite(max_norm) && max_norm >= 0, "max_norm: expected a finite number >= 0, got ",
                    max_norm);
  TORCH_CHECK_VALUE(std::isfinite(reg_eps) && reg_eps >= 0, "reg_eps: expected a finite number >= 0, got ", reg_eps);
  return RuleParams{static_cast<Rule>(id), tau, gamma, symmetric == 1.0, margin, c, w_a, w_b, max_norm, reg_eps};
}

}  // namespace pareto_lora

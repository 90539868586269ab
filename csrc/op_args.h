// The whole "validate" half of each op, shared by the CPU and CUDA backends: one call per op
// checks every argument (validate.h, in a fixed order) and returns what the launch needs, so a
// device file only launches and the two backends cannot drift apart in what they accept.
// Every check raises ValueError("<argument>: expected ...") before anything is written.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "rule.h"
#include "validate.h"

namespace pareto_lora {

// The device type an op's kernels run on (its dispatch key). The dispatcher picks a kernel by the
// highest-priority device among all tensor arguments, so a kernel can still be handed tensors
// that live elsewhere: mixed devices, or a direct redispatch with meta tensors, whose data
// pointers must never be read.
struct OpDevice {
  at::DeviceType type;

  void require(const at::Tensor& t, const char* name) const {
    if (type == at::kCPU) {
      TORCH_CHECK_VALUE(t.is_cpu(), name, ": expected device cpu, got ", t.device());
    } else {
      TORCH_CHECK_VALUE(t.device().type() == type, name,
                        ": expected a CUDA tensor (other arguments are on the GPU), got device ", t.device());
    }
  }

  // Before any data is read: refuses devices whose data the op cannot read (meta, ...). A CPU
  // tensor that reaches a GPU op is left to require() at the end of the checks, so that the
  // co-location checks in between first name the argument that is on the GPU.
  void require_readable(const at::Tensor& t, const char* name) const {
    if (!t.is_cpu()) require(t, name);
  }
};

inline constexpr OpDevice kCpuOp{at::kCPU};
inline constexpr OpDevice kCudaOp{at::kCUDA};

// out may be a or b exactly (in place: every element is read before it is written), or memory
// disjoint from both; with a partial overlap a tile would read elements that another tile has
// already overwritten. Decided on address ranges, not on storage identity: two storage objects
// can share memory (two torch.from_numpy views of one NumPy buffer). out, a and b are contiguous
// with one numel and dtype here, so the same start means the same elements.
inline bool partially_overlaps(const at::Tensor& out, const at::Tensor& x) {
  if (out.numel() == 0 || x.numel() == 0) return false;
  const auto ob = reinterpret_cast<uintptr_t>(out.const_data_ptr());
  const auto xb = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  return ob != xb && ob < xb + x.nbytes() && xb < ob + out.nbytes();
}

inline void check_out_overlap(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(!partially_overlaps(out, a),
                    "out: expected a, b or memory disjoint from both; it partially overlaps a");
  TORCH_CHECK_VALUE(!partially_overlaps(out, b),
                    "out: expected a, b or memory disjoint from both; it partially overlaps b");
}

// `active` as the kernels read it: contiguous (any stride is accepted), on the CPU or next to
// `device`; undefined when absent. Called after every check: the copy allocates.
inline at::Tensor contiguous_active(const std::optional<at::Tensor>& active) {
  return active.has_value() ? active->contiguous() : at::Tensor();
}

struct SegmentArgs {
  at::Tensor offsets;  // CPU, contiguous, validated against a.numel()
  int64_t num_segments;
  const int64_t* offsets_ptr() const { return offsets.const_data_ptr<int64_t>(); }
};

struct IntegrateArgs : SegmentArgs {
  RuleParams rule;
  at::Tensor active;  // see contiguous_active; one per group
  // The training-step arguments (undefined when absent). groups is on the CPU (int64 [G+1]);
  // without it every segment is its own group (num_groups == num_segments).
  at::Tensor groups;
  int64_t num_groups;
  at::Tensor poison;  // 0-d bool on a's device
  at::Tensor stats;   // given [S, 3] float64 on a's device
  const int64_t* groups_ptr() const { return groups.defined() ? groups.const_data_ptr<int64_t>() : nullptr; }
};

struct RuleArgs {
  int64_t num_segments;
  RuleParams rule;
  at::Tensor active;  // see contiguous_active
};

// a, b and offsets.
inline SegmentArgs checked_segments(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                    OpDevice dev) {
  check_buffers(a, b);
  dev.require_readable(a, "a");  // b is on a's device; the offsets' values are read next
  at::Tensor off = checked_offsets(a, offsets);
  const int64_t g = off.numel() - 1;
  return SegmentArgs{std::move(off), g};
}

inline SegmentArgs checked_stats_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                      OpDevice dev) {
  SegmentArgs args = checked_segments(a, b, offsets, dev);
  dev.require(a, "a");
  return args;
}

inline SegmentArgs checked_combine(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                   const at::Tensor& coeffs, const at::Tensor& out, OpDevice dev) {
  SegmentArgs args = checked_segments(a, b, offsets, dev);
  check_coeffs(coeffs, args.num_segments, a.device());
  check_out(out, a);
  check_out_overlap(out, a, b);
  dev.require(a, "a");
  return args;
}

// The order of the checks is python/pareto_lora/checks.py's check_integrate: a, b, offsets, out,
// groups, active, poison, stats, then the rule's scalars.
inline IntegrateArgs checked_integrate(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                       const at::Tensor& out, c10::string_view rule, c10::ArrayRef<double> params,
                                       const std::optional<at::Tensor>& active, const std::optional<at::Tensor>& groups,
                                       const std::optional<at::Tensor>& poison,
                                       const std::optional<at::Tensor>& stats, OpDevice dev) {
  SegmentArgs seg = checked_segments(a, b, offsets, dev);
  check_out(out, a);
  check_out_overlap(out, a, b);
  at::Tensor host_groups;
  int64_t num_groups = seg.num_segments;
  if (groups.has_value()) {
    host_groups = checked_groups(*groups, seg.num_segments, a.device());
    num_groups = host_groups.numel() - 1;
  }
  check_active(active, num_groups, groups.has_value() ? "group" : "segment");
  if (active.has_value()) check_host_or(*active, "active", a.device());
  if (poison.has_value()) check_poison(*poison, a.device());
  if (stats.has_value()) check_given_stats(*stats, seg.num_segments, a.device());
  const RuleParams p = parse_rule_params(std::string(rule), params);
  dev.require(a, "a");
  return IntegrateArgs{std::move(seg),
                       p,
                       contiguous_active(active),
                       std::move(host_groups),
                       num_groups,
                       poison.has_value() ? *poison : at::Tensor(),
                       stats.has_value() ? stats->contiguous() : at::Tensor()};
}

inline RuleArgs checked_rule_args(const at::Tensor& stats, c10::string_view rule, c10::ArrayRef<double> params,
                                  const std::optional<at::Tensor>& active, OpDevice dev) {
  const int64_t g = check_stats(stats);
  check_active(active, g);
  const RuleParams p = parse_rule_params(std::string(rule), params);
  dev.require_readable(stats, "stats");
  if (active.has_value()) {
    if (stats.is_cpu()) {  // e.g. the GPU op, picked for a GPU `active`
      TORCH_CHECK_VALUE(active->is_cpu(), "active: expected device cpu (same as stats), got ", active->device());
    } else {
      check_host_or(*active, "active", stats.device());
    }
  }
  dev.require(stats, "stats");
  return RuleArgs{g, p, contiguous_active(active)};
}

}  // namespace pareto_lora

// The "validate" half of the K-objective ops (gram, combine_many), shared by the CPU and CUDA
// backends. The checks run in the order of python/pareto_lora/multi/checks.py and raise the same
// ValueError messages (each gradient named by its place, grads[k]) before anything is written.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "multi_limits.h"
#include "op_args.h"
#include "validate.h"

namespace pareto_lora {

// A shape as Python prints tuple(t.shape): "(3, 2)", "(3,)", "()" (the messages quote it so).
inline std::string py_shape(c10::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

inline std::string grad_name(size_t k) { return "grads[" + std::to_string(k) + "]"; }

// multi/checks.py check_grads: 2..kMaxObjectives contiguous floating buffers of grads[0]'s
// dtype, numel and device.
inline void check_grads(c10::ArrayRef<at::Tensor> grads) {
  TORCH_CHECK_VALUE(grads.size() >= 2 && grads.size() <= static_cast<size_t>(kMaxObjectives), "grads: expected 2 to ",
                    kMaxObjectives, " tensors (one per objective), got ", grads.size());
  const at::Tensor& first = grads[0];
  for (size_t k = 0; k < grads.size(); ++k) {
    const at::Tensor& g = grads[k];
    const std::string name = grad_name(k);
    TORCH_CHECK_VALUE(is_supported_float(g.scalar_type()), name,
                      ": expected dtype float32, bfloat16, float16 or float64, got ", dtype_name(g.scalar_type()));
    TORCH_CHECK_VALUE(g.is_contiguous(), name, ": expected a contiguous tensor (flat gradient buffer)");
    if (k == 0) continue;
    TORCH_CHECK_VALUE(g.numel() == first.numel(), name, ": expected numel ", first.numel(), " (same as grads[0]), got ",
                      g.numel());
    TORCH_CHECK_VALUE(g.scalar_type() == first.scalar_type(), name, ": expected dtype ",
                      dtype_name(first.scalar_type()), " (same as grads[0]), got ", dtype_name(g.scalar_type()));
    TORCH_CHECK_VALUE(g.device() == first.device(), name, ": expected device ", first.device(),
                      " (same as grads[0]), got ", g.device());
  }
}

// multi/checks.py check_weights: float32 or float64 [S, K] on the gradients' device.
inline void check_many_coeffs(const at::Tensor& coeffs, int64_t num_segments, int64_t k, const at::Device& device) {
  TORCH_CHECK_VALUE(coeffs.scalar_type() == at::kFloat || coeffs.scalar_type() == at::kDouble,
                    "coeffs: expected dtype float32 or float64, got ", dtype_name(coeffs.scalar_type()));
  TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(0) == num_segments && coeffs.size(1) == k,
                    "coeffs: expected shape [", num_segments, ", ", k,
                    "] (one weight per segment and objective), got ", py_shape(coeffs.sizes()));
  TORCH_CHECK_VALUE(coeffs.device() == device, "coeffs: expected device ", device, " (same as grads[0]), got ",
                    coeffs.device());
}

// multi/checks.py _check_out: out may be one of grads exactly (in place: each element is read
// before it is written) or memory disjoint from all of them.
inline void check_many_out(const at::Tensor& out, c10::ArrayRef<at::Tensor> grads) {
  const at::Tensor& first = grads[0];
  TORCH_CHECK_VALUE(out.numel() == first.numel(), "out: expected numel ", first.numel(), " (same as grads[0]), got ",
                    out.numel());
  TORCH_CHECK_VALUE(out.scalar_type() == first.scalar_type(), "out: expected dtype ", dtype_name(first.scalar_type()),
                    " (same as grads[0]), got ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.device() == first.device(), "out: expected device ", first.device(),
                    " (same as grads[0]), got ", out.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: expected a contiguous tensor");
  TORCH_CHECK_VALUE(!out.requires_grad(), "out: expected a tensor that does not require grad (the op writes into it "
                    "outside autograd); pass out.detach() or a gradient buffer");
  for (size_t k = 0; k < grads.size(); ++k) {
    TORCH_CHECK_VALUE(!partially_overlaps(out, grads[k]),
                      "out: expected one of grads or memory disjoint from all; it partially overlaps grads[", k, "]");
  }
}

// The gradients' data pointers, for the kernels (every check has passed).
struct ManyArgs : SegmentArgs {
  int k;
  std::vector<const void*> ptrs;
};

inline ManyArgs many_segments(c10::ArrayRef<at::Tensor> grads, const at::Tensor& offsets, OpDevice dev) {
  check_grads(grads);
  dev.require_readable(grads[0], "grads[0]");  // the others are on its device; the offsets are read next
  at::Tensor off = checked_offsets(grads[0], offsets);
  const int64_t s = off.numel() - 1;
  std::vector<const void*> ptrs;
  for (const at::Tensor& g : grads) ptrs.push_back(g.const_data_ptr());
  return ManyArgs{{std::move(off), s}, static_cast<int>(grads.size()), std::move(ptrs)};
}

inline ManyArgs checked_gram(c10::ArrayRef<at::Tensor> grads, const at::Tensor& offsets, OpDevice dev) {
  ManyArgs args = many_segments(grads, offsets, dev);
  dev.require(grads[0], "grads[0]");
  return args;
}

inline ManyArgs checked_combine_many(c10::ArrayRef<at::Tensor> grads, const at::Tensor& offsets,
                                     const at::Tensor& coeffs, const at::Tensor& out, OpDevice dev) {
  ManyArgs args = many_segments(grads, offsets, dev);
  check_many_coeffs(coeffs, args.num_segments, args.k, grads[0].device());
  check_many_out(out, grads);
  dev.require(grads[0], "grads[0]");
  return args;
}

}  // namespace pareto_lora

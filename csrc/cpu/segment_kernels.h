// CPU kernels behind the pareto_lora ops (see segment_kernels.cpp for the chunking scheme).
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace pareto_lora {

// stats[3*s + {0,1,2}] = ||a_s||^2, ||b_s||^2, a_s.b_s for every segment s, in double (exact
// products, double sums). Offsets are checked.
void segment_stats_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                       double* stats);

// out_s = coeffs[2*s] * a_s + coeffs[2*s + 1] * b_s. out may alias a or b.
void combine_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                 const double* coeffs, at::Tensor& out);

// Kernels over one chunk (contiguous, inside one segment), type-erased so that one table per CPU
// capability can be picked at run time.
struct ChunkKernels {
  struct Pair {
    void (*stats)(const void* a, const void* b, int64_t n, double* out3);
    void (*combine)(const void* a, const void* b, void* out, int64_t n, double alpha, double beta);
  };
  Pair by_dtype[4];  // float, double, bfloat16, half

  const Pair& get(at::ScalarType t) const {
    switch (t) {
      case at::kFloat: return by_dtype[0];
      case at::kDouble: return by_dtype[1];
      case at::kBFloat16: return by_dtype[2];
      case at::kHalf: return by_dtype[3];
      default: TORCH_CHECK_VALUE(false, "a: expected dtype float32, bfloat16, float16 or float64, got ", t);
    }
  }
};

namespace base {
extern const ChunkKernels kernels;
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
namespace avx2 {
extern const ChunkKernels kernels;
}
#endif

}  // namespace pareto_lora

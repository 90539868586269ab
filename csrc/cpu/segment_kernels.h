// CPU kernels behind the pareto_lora ops (see segment_kernels.cpp for the chunking scheme).
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace pareto_lora {

// stats[3*s + {0,1,2}] = ||a_s||^2, ||b_s||^2, a_s.b_s for every segment s. Offsets are checked.
void segment_stats_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                       float* stats);

// out_s = coeffs[2*s] * a_s + coeffs[2*s + 1] * b_s. out may alias a or b.
void combine_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                 const double* coeffs, at::Tensor& out);

}  // namespace pareto_lora

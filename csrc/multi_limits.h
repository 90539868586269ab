// The bound on K of the K-objective ops, torch-free (the CUDA kernels in csrc/cuda/multi_kernels.cuh
// and their CPU emulation include it without torch; csrc/multi_args.h validates against it).
#pragma once

namespace pareto_lora {

// rules.MAX_OBJECTIVES (python/pareto_lora/rules.py): the kernels keep one accumulator per pair
// g_i . g_j in registers, so K is bounded at compile time; tests/backends/test_multi_kernels.py
// checks that the two values agree.
inline constexpr int kMaxObjectives = 8;

inline constexpr int num_pairs(int k) { return k * (k + 1) / 2; }

}  // namespace pareto_lora

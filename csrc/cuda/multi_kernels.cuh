// The K-objective kernels (gram, combine_many) and their host tile table, torch-free: included by
// multi_ops.cu (the ops) and by the CPU emulation (tools/cuda_emu/), which runs them on the CPU.
// What they compute and why: multi_ops.cu's header comment.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/DeviceUtils.cuh>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../multi_limits.h"

namespace pareto_lora {
namespace multi_kernel {

constexpr int kMultiThreads = 256;
// Elements per thread and tile: the block reduction of up to 36 sums is amortised over 16 KiB
// (float32) per buffer and tile.
constexpr int64_t kTile = int64_t{kMultiThreads} * 16;

template <typename T>
struct Ptrs {
  const T* g[kMaxObjectives];
};

// Scratch is sized for the narrowest warp of the target, as in integrate_kernel.cuh
// (C10_WARP_SIZE_LOWER_BOUND: 32 on NVIDIA, 64 on CDNA; absent before torch 2.12, then 32).
#ifndef C10_WARP_SIZE_LOWER_BOUND
#define C10_WARP_SIZE_LOWER_BOUND 32
#endif
constexpr int kMultiMaxWarps = kMultiThreads / C10_WARP_SIZE_LOWER_BOUND;

// out[q * stride] = the block's sum of acc[q], q < P: a fixed shuffle tree within each warp, then
// thread q adds the warps' values in warp order. Two barriers for all P sums.
template <int P>
__device__ __forceinline__ void block_sums(double (&acc)[P], double* out, int64_t stride) {
  static_assert(kMultiThreads % C10_WARP_SIZE == 0 && kMultiThreads / C10_WARP_SIZE <= kMultiMaxWarps,
                "kMultiThreads must be whole warps that fit the scratch");
  static_assert(P <= kMultiThreads, "one thread per column in the last step");
  __shared__ double scratch[P][kMultiMaxWarps];
  const int warp_size = C10_WARP_SIZE;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size;
#pragma unroll
  for (int q = 0; q < P; ++q) {
    for (int o = warp_size / 2; o > 0; o >>= 1) acc[q] += WARP_SHFL_DOWN(acc[q], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < P; ++q) scratch[q][warp] = acc[q];
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < P) {
    double total = 0.0;
    for (int w = 0; w < kMultiThreads / warp_size; ++w) total += scratch[threadIdx.x][w];
    out[threadIdx.x * stride] = total;
  }
}

// partial[q * num_tiles + t] = sum over tile t of g_i g_j, (i, j) = pairs(K)[q].
template <int K, typename T>
__global__ void __launch_bounds__(kMultiThreads)
    tile_gram_kernel(const Ptrs<T> p, const int64_t* tiles, int64_t num_tiles, double* partial) {
  using acc_t = at::opmath_type<T>;
  constexpr int P = num_pairs(K);
  const int64_t t = blockIdx.x;
  const int64_t start = tiles[num_tiles + t], end = tiles[2 * num_tiles + t];
  double acc[P];
#pragma unroll
  for (int q = 0; q < P; ++q) acc[q] = 0.0;
  for (int64_t i = start + threadIdx.x; i < end; i += kMultiThreads) {
    double x[K];
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = static_cast<double>(static_cast<acc_t>(p.g[k][i]));
    int q = 0;
#pragma unroll
    for (int a = 0; a < K; ++a) {
#pragma unroll
      for (int b = a; b < K; ++b) acc[q++] += x[a] * x[b];
    }
  }
  block_sums<P>(acc, partial + t, num_tiles);
}

// stats[s, q] = +0.0 + the slots of segment s's tiles, in tile order: one thread per (s, q).
__global__ void gram_reduce_kernel(const double* partial, const int64_t* seg_tiles, int64_t num_segments,
                                   int64_t num_tiles, int p, double* stats) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= num_segments * p) return;
  const int64_t s = id / p, q = id % p;
  double total = 0.0;
  for (int64_t t = seg_tiles[s]; t < seg_tiles[s + 1]; ++t) total += partial[q * num_tiles + t];
  stats[id] = total;
}

template <int K, typename T, typename C>
__global__ void __launch_bounds__(kMultiThreads)
    combine_many_kernel(const Ptrs<T> p, T* out, const int64_t* tiles, int64_t num_tiles, const C* coeffs) {
  using acc_t = at::opmath_type<T>;
  const int64_t t = blockIdx.x;
  const int64_t seg = tiles[t], start = tiles[num_tiles + t], end = tiles[2 * num_tiles + t];
  acc_t w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) w[k] = static_cast<acc_t>(coeffs[K * seg + k]);
  // Every element is read before it is written by the same thread: out may be one of grads.
  for (int64_t i = start + threadIdx.x; i < end; i += kMultiThreads) {
    acc_t acc = w[K - 1] * static_cast<acc_t>(p.g[K - 1][i]);
#pragma unroll
    for (int k = K - 2; k >= 0; --k) acc = w[k] * static_cast<acc_t>(p.g[k][i]) + acc;
    out[i] = static_cast<T>(acc);
  }
}

// Threads per block of gram_reduce_kernel (one thread per segment and column).
constexpr int kGramReduceThreads = 128;

// The tile table (rows: segment, start, end; int64 [3, count]) and each segment's first tile
// ([S + 1]): tiles of at most kTile elements that never cross a segment boundary.
struct TileTable {
  std::vector<int64_t> table, first;
  int64_t count;
};

inline TileTable tile_table(const int64_t* offsets, int64_t num_segments) {
  std::vector<int64_t> seg, start, end, first{0};
  for (int64_t s = 0; s < num_segments; ++s) {
    for (int64_t i = offsets[s]; i < offsets[s + 1]; i += kTile) {
      seg.push_back(s);
      start.push_back(i);
      end.push_back(std::min(i + kTile, offsets[s + 1]));
    }
    first.push_back(static_cast<int64_t>(seg.size()));
  }
  const int64_t count = static_cast<int64_t>(seg.size());
  std::vector<int64_t> table(seg);
  table.insert(table.end(), start.begin(), start.end());
  table.insert(table.end(), end.begin(), end.end());
  return TileTable{std::move(table), std::move(first), count};
}

// f(std::integral_constant<int, K>{}) for the runtime K (checked: 2 <= K <= kMaxObjectives).
template <typename F>
void with_k(int k, const F& f) {
  static_assert(kMaxObjectives == 8, "one case per K below");
  switch (k) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

}  // namespace multi_kernel
}  // namespace pareto_lora

// CUDA (and, hipified, ROCm) implementations of the K-objective ops: gram and combine_many.
//
// Validation is multi_args.h's, shared with csrc/cpu/multi_kernels.cpp. The host cuts the flat
// buffers into tiles of at most kTile elements that never cross a segment boundary (built from the
// CPU offsets, sent with one non-blocking copy from pinned memory: no host sync).
// gram: one block per tile reads the K buffers once and keeps the K(K+1)/2 sums of exact products
// (double; float64 inputs: each product rounded once) per thread, reduces them over the block with
// a fixed tree (warp shuffles over C10_WARP_SIZE lanes, then the warps in order: the same code on
// 64-lane wavefronts) into the tile's own slots; a second kernel adds each segment's slots in tile
// order. No float atomics:
// the statistics depend only on the inputs and kTile, never on scheduling.
// combine_many: one block per tile, acc = c[K-1] g[K-1], then acc = c[k] g[k] + acc (k = K-2 .. 0)
// in at::opmath_type (float for bf16/fp16/float32), rounded once: with K = 2 the expression of the
// two-objective combine (integrate_kernel.cuh, alpha a + beta b). Columns: multi/gram.py's pairs(K).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/DeviceUtils.cuh>
#include <c10/macros/Macros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../multi_args.h"

namespace pareto_lora {
namespace {

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

// The tile table (rows: segment, start, end) and each segment's first tile, on `device`.
struct Tiles {
  at::Tensor table;      // int64 [3, T]
  at::Tensor seg_tiles;  // int64 [S + 1]
  int64_t count;
};

at::Tensor upload(const std::vector<int64_t>& words, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(words.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  if (!words.empty()) std::memcpy(host.data_ptr<int64_t>(), words.data(), words.size() * sizeof(int64_t));
  return host.to(device, /*non_blocking=*/true);
}

Tiles make_tiles(const int64_t* offsets, int64_t num_segments, const at::Device& device) {
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
  return Tiles{upload(table, device), upload(first, device), count};
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

template <typename T>
Ptrs<T> pointers(at::TensorList grads) {
  Ptrs<T> p{};
  for (size_t k = 0; k < grads.size(); ++k) p.g[k] = grads[k].const_data_ptr<T>();
  return p;
}

at::Tensor gram_cuda(at::TensorList grads, const at::Tensor& offsets) {
  const ManyArgs args = checked_gram(grads, offsets, kCudaOp);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const int p = num_pairs(args.k);
  at::Tensor stats = at::empty({args.num_segments, p}, grads[0].options().dtype(at::kDouble));
  if (args.num_segments == 0) return stats;
  const Tiles tiles = make_tiles(args.offsets_ptr(), args.num_segments, grads[0].device());
  at::Tensor partial = at::empty({p * tiles.count}, stats.options());
  const auto stream = c10::cuda::getCurrentCUDAStream(grads[0].device().index());
  const auto grid = static_cast<unsigned int>(tiles.count);  // < 2^31: kTile * 2^31 elements is far off
  if (tiles.count > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads[0].scalar_type(), "pareto_lora_gram", [&] {
      with_k(args.k, [&](auto kc) {
        constexpr int K = decltype(kc)::value;
        tile_gram_kernel<K, scalar_t><<<grid, kMultiThreads, 0, stream.stream()>>>(
            pointers<scalar_t>(grads), tiles.table.const_data_ptr<int64_t>(), tiles.count,
            partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  const int64_t items = args.num_segments * p;
  const int threads = 128;
  gram_reduce_kernel<<<static_cast<unsigned int>((items + threads - 1) / threads), threads, 0, stream.stream()>>>(
      partial.const_data_ptr<double>(), tiles.seg_tiles.const_data_ptr<int64_t>(), args.num_segments, tiles.count, p,
      stats.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

void combine_many_cuda(at::TensorList grads, const at::Tensor& offsets, const at::Tensor& coeffs, at::Tensor out) {
  const ManyArgs args = checked_combine_many(grads, offsets, coeffs, out, kCudaOp);
  // Everything is checked: from here on writes may happen.
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const Tiles tiles = make_tiles(args.offsets_ptr(), args.num_segments, grads[0].device());
  if (tiles.count == 0) return;
  const at::Tensor c = coeffs.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream(grads[0].device().index());
  const auto grid = static_cast<unsigned int>(tiles.count);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads[0].scalar_type(), "pareto_lora_combine_many", [&] {
    with_k(args.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      const auto table = tiles.table.const_data_ptr<int64_t>();
      scalar_t* po = out.mutable_data_ptr<scalar_t>();
      if (c.scalar_type() == at::kDouble) {
        combine_many_kernel<K, scalar_t, double><<<grid, kMultiThreads, 0, stream.stream()>>>(
            pointers<scalar_t>(grads), po, table, tiles.count, c.const_data_ptr<double>());
      } else {
        combine_many_kernel<K, scalar_t, float><<<grid, kMultiThreads, 0, stream.stream()>>>(
            pointers<scalar_t>(grads), po, table, tiles.count, c.const_data_ptr<float>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pareto_lora, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("combine_many", &combine_many_cuda);
}

}  // namespace pareto_lora

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
#include "multi_kernels.cuh"

namespace pareto_lora {
namespace {

using namespace multi_kernel;

// The tile table (multi_kernels.cuh) on `device`.
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
  const TileTable t = tile_table(offsets, num_segments);
  return Tiles{upload(t.table, device), upload(t.first, device), t.count};
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
  const int threads = kGramReduceThreads;
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

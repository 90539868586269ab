// CPU drivers: per-segment statistics and the per-segment linear combination.
//
// Work is cut into fixed-size chunks that never cross a segment boundary. Each chunk writes
// its partial sums into its own slot, and a segment's slots are added in chunk order, so the
// result does not depend on the thread count or on scheduling (bitwise reproducible).
// The sums run in double (vector lanes within a chunk, then across chunks), and the statistics
// are returned in double: accurate over the whole float32 range (see segment_kernels.inc).
// The chunk kernels (segment_kernels.inc) exist once per CPU capability; the best one this CPU
// supports is chosen once.
#include "segment_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace pareto_lora {
namespace {

// Elements per chunk: large enough that the per-chunk bookkeeping is noise, small enough that
// 1000s of segments of a few K elements still spread over the threads.
constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t seg, begin, end;
};

std::vector<Chunk> make_chunks(const int64_t* offsets, int64_t num_segments) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < num_segments; ++s) {
    for (int64_t i = offsets[s]; i < offsets[s + 1]; i += kChunk) {
      chunks.push_back({s, i, std::min(i + kChunk, offsets[s + 1])});
    }
  }
  return chunks;
}

const ChunkKernels& best_kernels() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool has_avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (has_avx2) return avx2::kernels;
#endif
  return base::kernels;
}

}  // namespace

void segment_stats_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                       double* stats) {
  const std::vector<Chunk> chunks = make_chunks(offsets, num_segments);
  std::vector<double> partial(3 * chunks.size());
  const auto kernel = best_kernels().get(a.scalar_type()).stats;
  const char* pa = static_cast<const char*>(a.const_data_ptr());
  const char* pb = static_cast<const char*>(b.const_data_ptr());
  const int64_t item = a.element_size();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      kernel(pa + ch.begin * item, pb + ch.begin * item, ch.end - ch.begin, &partial[3 * c]);
    }
  });
  std::vector<double> total(3 * num_segments, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int k = 0; k < 3; ++k) total[3 * chunks[c].seg + k] += partial[3 * c + k];
  }
  std::copy(total.begin(), total.end(), stats);
}

void combine_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                 const double* coeffs, at::Tensor& out) {
  const std::vector<Chunk> chunks = make_chunks(offsets, num_segments);
  const auto kernel = best_kernels().get(a.scalar_type()).combine;
  const char* pa = static_cast<const char*>(a.const_data_ptr());
  const char* pb = static_cast<const char*>(b.const_data_ptr());
  char* po = static_cast<char*>(out.mutable_data_ptr());
  const int64_t item = a.element_size();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      kernel(pa + ch.begin * item, pb + ch.begin * item, po + ch.begin * item, ch.end - ch.begin,
             coeffs[2 * ch.seg], coeffs[2 * ch.seg + 1]);
    }
  });
}

}  // namespace pareto_lora

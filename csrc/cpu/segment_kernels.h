// CPU kernels behind the pareto_lora ops (see segment_kernels.cpp for the chunking scheme).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace pareto_lora {

// stats[3*s + {0,1,2}] = ||a_s||^2, ||b_s||^2, a_s.b_s for every segment s, in double (exact
// products, double sums; bf16/fp16 in float32 blocks first: kStatsBlockSets). Offsets are checked.
void segment_stats_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                       double* stats);

// out_s = coeffs[2*s] * a_s + coeffs[2*s + 1] * b_s. out may alias a or b.
void combine_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                 const double* coeffs, at::Tensor& out);

// The rule of one group: (alpha, beta) for the combine from the group's statistics stats3[0..2].
// Called once per group, from any thread (integrate_cpu), so it may write per-group outputs but
// nothing shared.
using GroupRule = std::function<std::pair<double, double>(int64_t group, const double* stats3)>;

// kAuto: one pass for segments whose a and b fit in L2, two passes for the others;
// PARETO_LORA_CPU_PATH=one_pass|two_pass|auto overrides it (benchmarks, tests). Every path gives
// bitwise the same statistics, coefficients and output.
enum class CpuPath { kAuto, kOnePass, kTwoPass };

// Group g is segments groups[g] .. groups[g+1]-1; groups == nullptr: every segment is its own group.
struct Grouping {
  const int64_t* groups;
  int64_t num_groups;
  int64_t first(int64_t g) const { return groups ? groups[g] : g; }
  int64_t end(int64_t g) const { return groups ? groups[g + 1] : g + 1; }
};

// stats -> rule (per group) -> combine: fills stats [S, 3] (or copies given_stats when not
// null: no statistics pass), group_stats [G, 3] (each group's rows summed left to right from
// +0.0) and out; calls rule once per group. A segment takes the one-pass path only when its
// group is that one segment.
void integrate_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                   const Grouping& grouping, const double* given_stats, double* stats, double* group_stats,
                   const GroupRule& rule, at::Tensor& out, CpuPath path = CpuPath::kAuto);

// How many distinct intra-op threads one at::parallel_for over at::get_num_threads() items ran on
// (a build check, exposed as pareto_lora._C.intra_op_threads()): 1 when this library was compiled
// without the OpenMP flags that ATen's header-only parallel_for needs to be parallel at all.
int64_t intra_op_threads_used();

// Elements per chunk of the statistics and the combine (segment_kernels.cpp, where the choice is
// explained). The K-objective gram (multi_kernels.cpp) cuts the same chunks and sums in the same
// lane order, so its K = 2 sums are segment_stats' bit for bit (float32 and float64).
constexpr int64_t kChunkElements = 16384;

// The summation order of the statistics, shared by every CPU build (base, AVX2, AVX-512) so that
// they give bitwise the same statistics: within a chunk, lane j (0 <= j < W, W = kStatsLaneBytes /
// element size: 8 for float32, 16 for bf16/fp16, 4 for float64) sums the exact products of
// elements j, j+W, j+2W, ... of the chunk's first n - n % W elements in that order; then the W lanes
// are added in lane order, then the remaining n % W elements one by one. 32 bytes is the width of
// at::vec::Vectorized in the AVX2 and portable builds; the AVX-512 build keeps it (two lane sets
// per 512-bit step) rather than its natural 64, which would change the bits between machines.
constexpr int64_t kStatsLaneBytes = 32;

// bf16 and fp16 (16 lanes): a bf16 x bf16 product (8 + 8 significant bits) and an fp16 x fp16
// product (11 + 11) are exact in float32, so within a chunk the lane sets are taken in blocks of
// kStatsBlockSets consecutive ones (the last block of a chunk may be shorter), and in each block
// every lane sums its products in float32 (from +0, in element order) and then adds that float
// sum to its double accumulator. A bf16 block whose elements are not all 0 or of magnitude in
// [2^-62, 2^62) (kBf16FloatMin/kBf16FloatEnd on the doubled bits, sign dropped; NaN and inf are
// outside) adds its products to the double accumulators one by one instead, as float32 and
// float64 always do: there a product could underflow or a block sum overflow float32. fp16's
// range needs no such test (products in [2^-48, 2^32]).
// Error: a lane's block sum of m <= 8 exact, normal products carries at most (m-1) 2^-24 of their
// absolute sum; the double additions on any path (<= 128 block sums per lane and chunk, 16 lanes,
// 15 tail elements, one partial per kChunk-element chunk) add (160 + n / 16384) 2^-53 more. So
// every statistic is within (7 2^-24 + (160 + n / 16384) 2^-53) sum |products| < 2^-21 sum
// |products| (any n < 2^40) of the exact value, inside rules.STATS_REL_ERR = 2^-20
// (tests/backends/test_cpu_stats_bound.py).
// Why: widening every element to double kept the AVX2 build compute-bound in bf16 (~1 element per
// cycle); a float32 FMA per product halves the work (bench/RESULTS.md, "AVX2-only machines").
constexpr int64_t kStatsBlockSets = 8;
constexpr uint16_t kBf16FloatMin = (127 - 62) << 8;  // doubled bits of 2^-62
constexpr uint16_t kBf16FloatEnd = (127 + 62) << 8;  // doubled bits of 2^62

// Software prefetch distance of the vector builds' loops: the statistics read two streams from
// DRAM at a few cycles per line, and one core's hardware prefetch alone kept them at ~60% of copy
// bandwidth. Measured (AVX2 build) at 16M elements, 1 thread: 12.1 -> 8.5 ms (float32), 11.3 ->
// 5.7 ms (bf16) for the statistics pass; 512 B ahead is too close, 1-4 KiB are within noise.
constexpr int64_t kPrefetchBytes = 2048;

// Kernels over one chunk (contiguous, inside one segment), type-erased so that one table per CPU
// capability can be picked at run time.
struct ChunkKernels {
  struct Pair {
    void (*stats)(const void* a, const void* b, int64_t n, double* out3);
    // stream: write out with non-temporal stores where the CPU build has them
    void (*combine)(const void* a, const void* b, void* out, int64_t n, double alpha, double beta, bool stream);
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
namespace avx512 {
extern const ChunkKernels kernels;
}
#endif

// The chunk kernels of the best build this CPU runs (avx512 > avx2 > base), unless
// PARETO_LORA_CPU_CAPABILITY=base|avx2|avx512 asks for another one this CPU supports (benchmarks,
// tests: every build gives bitwise the same statistics; see cpu_capability_name()).
const ChunkKernels& active_kernels();

// The name of the build active_kernels() returns now: "base", "avx2" or "avx512".
const char* cpu_capability_name();

// The names of the builds this CPU runs, from the portable one to the best one.
std::vector<const char*> cpu_capabilities();

}  // namespace pareto_lora

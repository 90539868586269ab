// CPU drivers: per-segment statistics, the per-segment linear combination, and the fused
// integrate that chooses, segment by segment, between one and two passes over memory.
//
// Work is cut into fixed-size chunks that never cross a segment boundary. Each chunk's partial
// sums are added into its segment's total in chunk order, whichever thread computed them, so the
// result does not depend on the thread count, on scheduling or on the path (bitwise reproducible).
// The sums run in double (vector lanes within a chunk, then across chunks; bf16/fp16 lanes first
// sum exact products over short float32 blocks, kStatsBlockSets), and the statistics are returned
// in double: within 2^-21 of sum |products| over the whole float32 range (segment_kernels.h).
// The chunk kernels exist once per CPU build (segment_kernels.inc for the portable and AVX2
// builds, segment_kernels_avx512.cpp); the best one this CPU runs is chosen at run time
// (active_kernels), and all of them sum in the same order (kStatsLaneBytes).
//
// Scheduling: threads claim batches of work items from a shared atomic counter (dynamic
// scheduling), not a static half each: on a shared machine a thread is regularly descheduled for
// milliseconds, and with a static split the whole call waits for it; one-pass segments of random
// sizes also balance better. Which thread runs an item never changes the result (see above).
// at::parallel_for is a header template: it is parallel only because setup.py compiles this file
// with OpenMP (without it every loop ran on the calling thread; intra_op_threads_used() below
// checks the build).
#include "segment_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace pareto_lora {
namespace {

// Elements per chunk: large enough that the per-chunk bookkeeping is noise, small enough that
// 1000s of segments of a few K elements still spread over the threads. Changing it changes the
// summation order, hence the bits of the statistics.
constexpr int64_t kChunk = kChunkElements;  // segment_kernels.h

// A segment whose a and b together take at most this many bytes is done in one pass over
// memory (stats, rule, combine while it is still in this core's L2; see integrate_cpu). Measured
// on a 2-vCPU Sapphire Rapids VM with 2 MiB of L2 per core (bench/threshold_cpu.py, float32, N =
// 16M): one pass takes 0.72-0.77x the two-pass time up to 1 MiB of a+b, 0.87x at 2 MiB and
// 1.04-1.10x from 4 MiB. Set at 1 MiB rather than 2: out's lines share the L2, and many server
// CPUs have 1-1.25 MiB of L2 per core.
constexpr int64_t kOnePassMaxBytes = 1 << 20;

struct Chunk {
  int64_t seg, begin, end;
};

void add_chunks(std::vector<Chunk>& chunks, int64_t s, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; i += kChunk) chunks.push_back({s, i, std::min(i + kChunk, hi)});
}

std::vector<Chunk> make_chunks(const int64_t* offsets, int64_t num_segments) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < num_segments; ++s) add_chunks(chunks, s, offsets[s], offsets[s + 1]);
  return chunks;
}

enum class Capability { kBase, kAvx2, kAvx512 };

constexpr const char* kCapabilityNames[] = {"base", "avx2", "avx512"};

Capability best_capability() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  static const bool has_avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  static const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f");
  if (has_avx512) return Capability::kAvx512;
  if (has_avx2) return Capability::kAvx2;
#endif
  return Capability::kBase;
}

}  // namespace

std::vector<const char*> cpu_capabilities() {
  const int best = static_cast<int>(best_capability());
  return std::vector<const char*>(kCapabilityNames, kCapabilityNames + best + 1);
}

namespace {

// Read on every call (a getenv: noise next to a chunk) so that tests can switch builds.
Capability capability() {
  const Capability best = best_capability();
  const char* env = std::getenv("PARETO_LORA_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return best;
  for (int c = 0; c <= static_cast<int>(best); ++c) {
    if (std::strcmp(env, kCapabilityNames[c]) == 0) return static_cast<Capability>(c);
  }
  std::string supported;
  for (const char* name : cpu_capabilities()) supported += std::string(supported.empty() ? "'" : ", '") + name + "'";
  TORCH_CHECK_VALUE(false, "PARETO_LORA_CPU_CAPABILITY: expected one of ", supported,
                    " (the builds this CPU runs), got '", env, "'");
}

// Runs fn(i) for i in [0, n) on the intra-op threads, each thread claiming the next batch when it
// is done with its last (see "Scheduling" above). A batch is a run of consecutive items of at
// least kChunk elements in all (size(i) elements each): with 1000s of segments of a few K
// elements, one claim per item cost more than the item (a contended atomic and the other core's
// writes to neighbouring partial sums and coefficients: 2 threads were no faster than 1 at 1M
// elements x 1024 segments). Items of a batch run in order on one thread; which thread runs them
// never changes the result.
template <typename Size, typename F>
void dynamic_for(int64_t n, const Size& size, const F& fn) {
  if (n <= 0) return;
  std::vector<int64_t> start{0};
  int64_t elems = 0;
  for (int64_t i = 0; i < n; ++i) {
    elems += size(i);
    if (elems >= kChunk && i + 1 < n) {
      start.push_back(i + 1);
      elems = 0;
    }
  }
  start.push_back(n);
  const int64_t batches = static_cast<int64_t>(start.size()) - 1;
  auto run = [&](int64_t k) {
    for (int64_t i = start[k]; i < start[k + 1]; ++i) fn(i);
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), batches);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t k = 0; k < batches; ++k) run(k);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < batches;
           k = next.fetch_add(1, std::memory_order_relaxed)) {
        run(k);
      }
    }
  });
}

// size(i) of a list of chunks, for dynamic_for
inline auto chunk_size(const std::vector<Chunk>& chunks) {
  return [&chunks](int64_t c) { return chunks[c].end - chunks[c].begin; };
}

struct Buffers {
  const char* a;
  const char* b;
  char* out;
  int64_t item;
  ChunkKernels::Pair kernel;

  Buffers(const at::Tensor& ta, const at::Tensor& tb, char* po)
      : a(static_cast<const char*>(ta.const_data_ptr())),
        b(static_cast<const char*>(tb.const_data_ptr())),
        out(po),
        item(ta.element_size()),
        kernel(active_kernels().get(ta.scalar_type())) {}

  void stats(const Chunk& c, double* out3) const {
    kernel.stats(a + c.begin * item, b + c.begin * item, c.end - c.begin, out3);
  }
  void combine(const Chunk& c, double alpha, double beta, bool stream) const {
    kernel.combine(a + c.begin * item, b + c.begin * item, out + c.begin * item, c.end - c.begin, alpha, beta, stream);
  }
};

// Statistics of the chunks, then their sums per segment in chunk order into stats[3*seg + k]
// (which must be zero for the segments the chunks cover).
void chunk_stats_into(const Buffers& buf, const std::vector<Chunk>& chunks, double* stats) {
  std::vector<double> partial(3 * chunks.size());
  dynamic_for(static_cast<int64_t>(chunks.size()), chunk_size(chunks),
              [&](int64_t c) { buf.stats(chunks[c], &partial[3 * c]); });
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int k = 0; k < 3; ++k) stats[3 * chunks[c].seg + k] += partial[3 * c + k];
  }
}

// Outputs at least this large are written with streaming stores (segment_kernels.inc): far
// bigger than the cores' L2, they would be evicted before anyone reads them back, and plain
// stores would read every line before writing it. Measured at 16M float32, G = 1024, 1 thread:
// 17.3 -> 11.9 ms (one pass), 21.6 -> 16.7 ms (two passes); bf16 is compute-bound, unchanged.
constexpr int64_t kStreamMinBytes = 16 << 20;

bool stream_output(int64_t bytes) { return bytes >= kStreamMinBytes; }

CpuPath path_from_env() {
  const char* env = std::getenv("PARETO_LORA_CPU_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return CpuPath::kAuto;
  if (std::strcmp(env, "one_pass") == 0) return CpuPath::kOnePass;
  if (std::strcmp(env, "two_pass") == 0) return CpuPath::kTwoPass;
  TORCH_CHECK_VALUE(false, "PARETO_LORA_CPU_PATH: expected 'one_pass', 'two_pass' or 'auto', got '", env, "'");
}

}  // namespace

void segment_stats_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                       double* stats) {
  const Buffers buf(a, b, nullptr);
  std::fill(stats, stats + 3 * num_segments, 0.0);
  chunk_stats_into(buf, make_chunks(offsets, num_segments), stats);
}

void combine_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                 const double* coeffs, at::Tensor& out) {
  const std::vector<Chunk> chunks = make_chunks(offsets, num_segments);
  const Buffers buf(a, b, static_cast<char*>(out.mutable_data_ptr()));
  dynamic_for(static_cast<int64_t>(chunks.size()), chunk_size(chunks), [&](int64_t c) {
    const Chunk& ch = chunks[c];
    buf.combine(ch, coeffs[2 * ch.seg], coeffs[2 * ch.seg + 1], stream_output(out.numel() * buf.item));
  });
}

// One pass for small segments: a thread takes a whole segment, sums its chunks' statistics in
// chunk order (the same additions as the two-pass path), decides the rule, and combines the same
// chunks while a and b are still in its L2: a and b cross the memory bus once (3N bytes instead
// of 5N). Only a segment that is its group on its own can do that: a group of several segments
// needs all of their statistics before its rule. Segments too large for L2, in larger groups (or
// too few to keep the threads busy) take two passes, their chunks spread over all threads, the
// group rules on the host in between. Both kinds run in the same parallel regions.
void integrate_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                   const Grouping& grouping, const double* given_stats, double* stats, double* group_stats,
                   const GroupRule& rule, at::Tensor& out, CpuPath path) {
  if (path == CpuPath::kAuto) path = path_from_env();
  const Buffers buf(a, b, static_cast<char*>(out.mutable_data_ptr()));
  const bool stream = stream_output(out.numel() * buf.item);
  const int64_t num_groups = grouping.num_groups;
  std::vector<int64_t> seg_group(num_segments);
  for (int64_t g = 0; g < num_groups; ++g) {
    for (int64_t s = grouping.first(g); s < grouping.end(g); ++s) seg_group[s] = g;
  }
  // One flag per group (char, not vector<bool>: threads write neighbouring entries).
  std::vector<char> ruled(num_groups, 0);
  std::vector<int64_t> small;
  std::vector<Chunk> large;
  if (given_stats != nullptr) {
    std::copy(given_stats, given_stats + 3 * num_segments, stats);
  } else {
    std::fill(stats, stats + 3 * num_segments, 0.0);
  }
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t g = seg_group[s];
    const int64_t bytes = 2 * (offsets[s + 1] - offsets[s]) * buf.item;
    const bool alone = grouping.end(g) - grouping.first(g) == 1 && given_stats == nullptr;
    const bool one = alone && (path == CpuPath::kOnePass || (path == CpuPath::kAuto && bytes <= kOnePassMaxBytes));
    if (one) {
      small.push_back(s);
    } else {
      add_chunks(large, s, offsets[s], offsets[s + 1]);
    }
  }
  // Each group's statistics: +0.0 + its segments' rows, left to right (reference.group_sums).
  auto rule_group = [&](int64_t g) {
    double* gs = group_stats + 3 * g;
    for (int k = 0; k < 3; ++k) gs[k] = 0.0;
    for (int64_t s = grouping.first(g); s < grouping.end(g); ++s) {
      for (int k = 0; k < 3; ++k) gs[k] += stats[3 * s + k];
    }
    ruled[g] = 1;
    return rule(g, gs);
  };
  const bool stats_pass = given_stats == nullptr;
  std::vector<double> partial(stats_pass ? 3 * large.size() : 0);
  // Large segments' statistics chunks and small segments' whole one-pass work, in one region;
  // small segments first: they are the longer items, claimed early they balance better.
  const int64_t n_small = static_cast<int64_t>(small.size());
  const int64_t n_large = stats_pass ? static_cast<int64_t>(large.size()) : 0;
  const auto large_size = chunk_size(large);
  auto item_size = [&](int64_t i) {
    return i < n_small ? offsets[small[i] + 1] - offsets[small[i]] : large_size(i - n_small);
  };
  dynamic_for(n_small + n_large, item_size, [&](int64_t i) {
    if (i >= n_small) {
      buf.stats(large[i - n_small], &partial[3 * (i - n_small)]);
      return;
    }
    const int64_t s = small[i];
    double* st = stats + 3 * s;
    for (int64_t lo = offsets[s]; lo < offsets[s + 1]; lo += kChunk) {
      double p[3];
      buf.stats({s, lo, std::min(lo + kChunk, offsets[s + 1])}, p);
      for (int k = 0; k < 3; ++k) st[k] += p[k];
    }
    const auto [alpha, beta] = rule_group(seg_group[s]);
    for (int64_t lo = offsets[s]; lo < offsets[s + 1]; lo += kChunk) {
      buf.combine({s, lo, std::min(lo + kChunk, offsets[s + 1])}, alpha, beta, stream);
    }
  });
  for (int64_t c = 0; c < n_large; ++c) {
    for (int k = 0; k < 3; ++k) stats[3 * large[c].seg + k] += partial[3 * c + k];
  }
  // The remaining groups' rules on the host (G is small), empty groups included (zero statistics).
  std::vector<double> coeffs(2 * num_groups);
  for (int64_t g = 0; g < num_groups; ++g) {
    if (ruled[g]) continue;
    const auto [alpha, beta] = rule_group(g);
    coeffs[2 * g] = alpha;
    coeffs[2 * g + 1] = beta;
  }
  dynamic_for(static_cast<int64_t>(large.size()), chunk_size(large), [&](int64_t c) {
    const Chunk& ch = large[c];
    const int64_t g = seg_group[ch.seg];
    buf.combine(ch, coeffs[2 * g], coeffs[2 * g + 1], stream);
  });
}

const ChunkKernels& active_kernels() {
  switch (capability()) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    case Capability::kAvx512: return avx512::kernels;
    case Capability::kAvx2: return avx2::kernels;
#endif
    default: return base::kernels;
  }
}

const char* cpu_capability_name() { return kCapabilityNames[static_cast<int>(capability())]; }

int64_t intra_op_threads_used() {
  const int64_t n = at::get_num_threads();
  std::vector<int> tid(static_cast<size_t>(std::max<int64_t>(n, 1)), -1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) tid[static_cast<size_t>(i)] = at::get_thread_num();
  });
  std::sort(tid.begin(), tid.end());
  return std::unique(tid.begin(), tid.end()) - tid.begin();
}

}  // namespace pareto_lora

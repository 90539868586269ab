// CPU implementations of the K-objective ops: gram (every g_i . g_j per segment, one pass over
// the K buffers) and combine_many (out = sum_k coeffs[s, k] g_k, one pass).
//
// Work is cut into the chunks of the two-objective kernels (kChunkElements, never across a
// segment boundary). gram: each chunk writes its sums to its own slot, and each segment adds its
// chunks' slots in chunk order, whichever thread computed them: bitwise the same statistics for
// any thread count. Within a chunk, lane j (W = lanes<T>(): 8, 4 for float64) sums the exact
// products of elements j, j+W, j+2W, ... in order, then the lanes are added in lane order, then
// the remaining elements one by one: segment_stats' order (segment_kernels.h), so with K = 2 the
// float32 and float64 statistics are segment_stats' bit for bit. bf16/fp16 products are summed in
// double directly, not in segment_stats' float32 blocks: a little more accurate, other bits.
// Cost: K(K+1)/2 double FMAs per element (36 at K = 8), so the Gram is compute-bound from K = 3
// or so on one core (bench/RESULTS.md, "K objectives").
// Error: any summation tree of n terms adds at most n - 1 times along a path, so every statistic
// is within (n - 1) 2^-53 sum |products| of the exact value (float32 and narrower: the products
// are exact in double), n 2^-53 for float64 inputs (each product rounded once) - first order.
//
// Column order: pairs(K) of python/pareto_lora/multi/gram.py, the row-major upper triangle.
//
// combine_many computes what the two-objective combine computes for each dtype (float32
// arithmetic for float32/bf16/fp16, double for float64; coefficients rounded to that type once),
// acc = c[K-1] g[K-1], then acc = fma(c[k], g[k], acc) for k = K-2 .. 0, rounded once to the
// buffers' dtype: with K = 2 that is the two-objective fma(alpha, a, beta * b), bit for bit. The
// portable build multiplies and adds without fusing, as the portable two-objective build does.
//
// Builds: each kernel is compiled twice, portable and (x86-64, GCC) with AVX2 + FMA + F16C enabled by a
// target attribute, picked by the two-objective kernels' choice (cpu_capability_name(),
// PARETO_LORA_CPU_CAPABILITY). The AVX2 build sums the statistics in the same order (an FMA on an
// exact product is the same addition), so the Gram is bitwise the same in both; the float64
// Gram always takes the portable build, where no product could be fused into its addition.
// The AVX2 build's fp16/bf16 conversions in the combine (and fp16's in the Gram): multi_x16.h.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../multi_args.h"
#include "multi_x16.h"
#include "segment_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PL_MULTI_AVX2 1
#endif

namespace pareto_lora {
namespace {

#define PL_ALWAYS_INLINE inline __attribute__((always_inline))

// The arithmetic type of the combine (at::opmath_type: float for float32/bf16/fp16).
template <typename T>
using opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
PL_ALWAYS_INLINE double widen(T v) {
  return static_cast<double>(static_cast<opmath<T>>(v));
}

// One block of a buffer widened to double (kF16c: fp16 through F16C, the AVX2 build only).
template <typename T, bool kF16c>
PL_ALWAYS_INLINE void widen_block(const T* src, double* dst, int64_t m) {
#ifdef PL_MULTI_AVX2
  if constexpr (kF16c && std::is_same_v<T, c10::Half>) return multi_x16::widen_f16c(src, dst, m);
#endif
  for (int64_t e = 0; e < m; ++e) dst[e] = widen(src[e]);
}

// Four doubles (GCC vector extension): one ymm register in the AVX2 build, two SSE2 registers in
// the portable one; `acc += x * y` on exact products is the same addition with or without FMA.
typedef double V4 __attribute__((vector_size(32)));

// (by reference: a V4 passed or returned by value changes the ABI between the two builds)
PL_ALWAYS_INLINE void load4(V4& v, const double* p) { std::memcpy(&v, p, sizeof v); }
PL_ALWAYS_INLINE void store4(double* p, const V4& v) { std::memcpy(p, &v, sizeof v); }

// Elements of a chunk widened to double per block (K x kBlock doubles: 16 KiB at K = 8, in L1),
// then multiplied pair by pair from there: every element is converted once, and each product
// costs one load next to its FMA, where holding all K(K+1)/2 x W lane sums in registers spilled
// them on every element (36 x 8 doubles at K = 8 against 16 ymm registers: 11x the memory floor).
constexpr int64_t kBlock = 128;

// acc[p][j] of the NB pairs (a, b0 + t), t < NB, over `m` widened elements (m a multiple of W):
// lane j adds the products of elements j, j + W, ... in element order. 8 vector accumulators.
template <int NB, int64_t W>
PL_ALWAYS_INLINE void pair_block(const double* xa, const double* const* xb, int64_t m, double* const* acc) {
  constexpr int V = static_cast<int>(W / 4);
  V4 r[NB][V];
  for (int t = 0; t < NB; ++t) {
    for (int v = 0; v < V; ++v) load4(r[t][v], acc[t] + 4 * v);
  }
  for (int64_t e = 0; e < m; e += W) {
    for (int v = 0; v < V; ++v) {
      V4 x, y;
      load4(x, xa + e + 4 * v);
      for (int t = 0; t < NB; ++t) {
        load4(y, xb[t] + e + 4 * v);
        r[t][v] += x * y;
      }
    }
  }
  for (int t = 0; t < NB; ++t) {
    for (int v = 0; v < V; ++v) store4(acc[t] + 4 * v, r[t][v]);
  }
}

// pair_block<nb> for a run-time nb <= NB: a compile-time count keeps the accumulators in registers.
template <int NB, int64_t W>
PL_ALWAYS_INLINE void pair_blocks(int nb, const double* xa, const double* const* xb, int64_t m, double* const* acc) {
  if constexpr (NB == 1) {
    pair_block<1, W>(xa, xb, m, acc);
  } else if (nb == NB) {
    pair_block<NB, W>(xa, xb, m, acc);
  } else {
    pair_blocks<NB - 1, W>(nb, xa, xb, m, acc);
  }
}

// Lanes of the statistics: segment_stats' for float32 (8) and float64 (4); bf16 and fp16 take 8
// as well (segment_stats sums those in float32 blocks, an order the Gram does not follow anyway):
// two vectors of four doubles per pair, where 16 lanes would leave room for two pairs per pass.
template <typename T>
constexpr int64_t lanes() {
  return std::is_same_v<T, double> ? 4 : 8;
}
static_assert(lanes<float>() == kStatsLaneBytes / 4 && lanes<double>() == kStatsLaneBytes / 8,
              "float32 and float64 sum in segment_stats' lanes (K = 2: its bits)");

// Sums of chunk [0, n) of the K buffers g[k] into out[0 .. P), in the order described above.
template <int K, typename T, bool kF16c>
PL_ALWAYS_INLINE void gram_chunk(const T* const* g, int64_t n, double* out) {
  constexpr int P = num_pairs(K);
  constexpr int64_t W = lanes<T>();
  constexpr int NB = static_cast<int>(32 / W);  // pairs per pass over a block: 8 vector accumulators
  static_assert(W % 4 == 0 && kBlock % W == 0, "whole vectors per lane set, whole lane sets per block");
  alignas(64) double acc[P][W] = {};
  alignas(64) double xd[K][kBlock];
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += kBlock) {
    const int64_t m = std::min(kBlock, full - i);
    for (int k = 0; k < K; ++k) widen_block<T, kF16c>(g[k] + i, xd[k], m);
    int p = 0;  // pairs (a, b), b = a .. K-1, NB at a time: columns p .. p + NB - 1
    for (int a = 0; a < K; ++a) {
      for (int b = a; b < K; b += NB) {
        const double* xb[NB];
        double* ac[NB];
        const int nb = std::min(NB, K - b);
        for (int t = 0; t < NB; ++t) {
          xb[t] = xd[std::min(b + t, K - 1)];
          ac[t] = acc[std::min(p + t, P - 1)];
        }
        pair_blocks<NB, W>(nb, xd[a], xb, m, ac);
        p += nb;
      }
    }
  }
  double tot[P] = {};
  for (int q = 0; q < P; ++q) {
    for (int64_t j = 0; j < W; ++j) tot[q] += acc[q][j];
  }
  for (int64_t i = full; i < n; ++i) {
    double x[K];
    for (int k = 0; k < K; ++k) x[k] = widen(g[k][i]);
    int q = 0;
    for (int a = 0; a < K; ++a) {
      for (int b = a; b < K; ++b, ++q) tot[q] += x[a] * x[b];
    }
  }
  for (int q = 0; q < P; ++q) out[q] = tot[q];
}

// out[i] = sum_k c[k] g[k][i] for i in [0, n). out may be one of g exactly: element i of every
// buffer is read before out[i] is written, hence no dependence between iterations (ivdep lets the
// compiler vectorise without a run-time overlap test that an in-place call would fail).
template <int K, typename T, bool kFma>
PL_ALWAYS_INLINE void combine_chunk(const T* const* g, T* out, int64_t n, const double* c) {
  using O = opmath<T>;
  O w[K];
  const T* p[K];
  for (int k = 0; k < K; ++k) {
    w[k] = static_cast<O>(c[k]);
    p[k] = g[k];
  }
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    O acc = w[K - 1] * static_cast<O>(p[K - 1][i]);
    for (int k = K - 2; k >= 0; --k) {
      if constexpr (kFma) {
        acc = std::fma(w[k], static_cast<O>(p[k][i]), acc);
      } else {
        acc = w[k] * static_cast<O>(p[k][i]) + acc;
      }
    }
    out[i] = static_cast<T>(acc);
  }
}

// Type-erased entry points: g[k] + begin are the chunk's K buffers.
using GramFn = void (*)(const void* const* g, int64_t begin, int64_t n, double* out);
using CombineFn = void (*)(const void* const* g, void* out, int64_t begin, int64_t n, const double* c);

template <int K, typename T, bool kF16c>
PL_ALWAYS_INLINE void gram_at(const void* const* g, int64_t begin, int64_t n, double* out) {
  const T* p[K];
  for (int k = 0; k < K; ++k) p[k] = static_cast<const T*>(g[k]) + begin;
  gram_chunk<K, T, kF16c>(p, n, out);
}

template <int K, typename T, bool kFma>
PL_ALWAYS_INLINE void combine_at(const void* const* g, void* out, int64_t begin, int64_t n, const double* c) {
  const T* p[K];
  for (int k = 0; k < K; ++k) p[k] = static_cast<const T*>(g[k]) + begin;
  combine_chunk<K, T, kFma>(p, static_cast<T*>(out) + begin, n, c);
}

template <int K, typename T>
void gram_base(const void* const* g, int64_t begin, int64_t n, double* out) {
  gram_at<K, T, false>(g, begin, n, out);
}

template <int K, typename T>
void combine_base(const void* const* g, void* out, int64_t begin, int64_t n, const double* c) {
  combine_at<K, T, false>(g, out, begin, n, c);
}

#ifdef PL_MULTI_AVX2
template <int K, typename T>
PL_AVX2_TARGET void gram_avx2(const void* const* g, int64_t begin, int64_t n, double* out) {
  gram_at<K, T, true>(g, begin, n, out);
}

template <int K, typename T>
PL_AVX2_TARGET void combine_avx2(const void* const* g, void* out, int64_t begin, int64_t n, const double* c) {
  if constexpr (sizeof(T) == 2) {
    const T* p[K];
    for (int k = 0; k < K; ++k) p[k] = static_cast<const T*>(g[k]) + begin;
    multi_x16::combine_chunk<K, T>(p, static_cast<T*>(out) + begin, n, c);
  } else {
    combine_at<K, T, true>(g, out, begin, n, c);
  }
}
#endif

// The kernels of K objectives (2 <= K <= kMaxObjectives) for one dtype and build.
template <typename T, int... Ks>
std::pair<GramFn, CombineFn> pick(int k, bool avx2, std::integer_sequence<int, Ks...>) {
  GramFn gram[] = {&gram_base<Ks + 2, T>...};
  CombineFn combine[] = {&combine_base<Ks + 2, T>...};
#ifdef PL_MULTI_AVX2
  if (avx2) {
    GramFn gram_v[] = {&gram_avx2<Ks + 2, T>...};
    CombineFn combine_v[] = {&combine_avx2<Ks + 2, T>...};
    // float64: the portable Gram (see the top of this file), the fused combine.
    return {std::is_same_v<T, double> ? gram[k - 2] : gram_v[k - 2], combine_v[k - 2]};
  }
#else
  (void)avx2;
#endif
  return {gram[k - 2], combine[k - 2]};
}

std::pair<GramFn, CombineFn> kernels_for(at::ScalarType t, int k) {
  const bool avx2 = std::strcmp(cpu_capability_name(), "base") != 0;
  const auto ks = std::make_integer_sequence<int, kMaxObjectives - 1>{};
  switch (t) {
    case at::kFloat: return pick<float>(k, avx2, ks);
    case at::kDouble: return pick<double>(k, avx2, ks);
    case at::kBFloat16: return pick<c10::BFloat16>(k, avx2, ks);
    case at::kHalf: return pick<c10::Half>(k, avx2, ks);
    default:
      TORCH_CHECK_VALUE(false, "grads[0]: expected dtype float32, bfloat16, float16 or float64, got ", dtype_name(t));
  }
}

struct Chunk {
  int64_t seg, begin, end;
};

std::vector<Chunk> make_chunks(const int64_t* offsets, int64_t num_segments) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < num_segments; ++s) {
    for (int64_t i = offsets[s]; i < offsets[s + 1]; i += kChunkElements) {
      chunks.push_back({s, i, std::min(i + kChunkElements, offsets[s + 1])});
    }
  }
  return chunks;
}

// fn(chunk index) on the intra-op threads; which thread runs a chunk never changes a result.
template <typename F>
void for_chunks(const std::vector<Chunk>& chunks, const F& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

at::Tensor gram(at::TensorList grads, const at::Tensor& offsets) {
  const ManyArgs args = checked_gram(grads, offsets, kCpuOp);
  const int p = num_pairs(args.k);
  at::Tensor stats = at::zeros({args.num_segments, p}, grads[0].options().dtype(at::kDouble));
  const std::vector<Chunk> chunks = make_chunks(args.offsets_ptr(), args.num_segments);
  const GramFn fn = kernels_for(grads[0].scalar_type(), args.k).first;
  std::vector<double> partial(p * chunks.size());
  for_chunks(chunks, [&](int64_t c) {
    fn(args.ptrs.data(), chunks[c].begin, chunks[c].end - chunks[c].begin, &partial[p * c]);
  });
  double* st = stats.mutable_data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) {  // each segment: +0.0, then its chunks in order
    for (int q = 0; q < p; ++q) st[p * chunks[c].seg + q] += partial[p * c + q];
  }
  return stats;
}

void combine_many(at::TensorList grads, const at::Tensor& offsets, const at::Tensor& coeffs, at::Tensor out) {
  const ManyArgs args = checked_combine_many(grads, offsets, coeffs, out, kCpuOp);
  // Everything is checked: from here on writes may happen.
  const at::Tensor c = coeffs.to(at::kDouble).contiguous();
  const double* pc = c.const_data_ptr<double>();
  const std::vector<Chunk> chunks = make_chunks(args.offsets_ptr(), args.num_segments);
  const CombineFn fn = kernels_for(grads[0].scalar_type(), args.k).second;
  void* po = out.mutable_data_ptr();
  for_chunks(chunks, [&](int64_t i) {
    const Chunk& ch = chunks[i];
    fn(args.ptrs.data(), po, ch.begin, ch.end - ch.begin, pc + args.k * ch.seg);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pareto_lora, CPU, m) {
  m.impl("gram", &gram);
  m.impl("combine_many", &combine_many);
}

}  // namespace pareto_lora

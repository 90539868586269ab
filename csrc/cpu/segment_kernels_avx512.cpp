// Chunk kernels for x86-64 CPUs with AVX-512F, chosen at run time (segment_kernels.cpp).
//
// Why a third build: the bf16 and fp16 combine and the float32 statistics do the same work in
// half the instructions with 512-bit registers. (bf16/fp16 statistics were compute-bound in the
// AVX2 build while it widened every element to double; since they sum float32 blocks
// (kStatsBlockSets) the AVX2 kernel is memory-bound, and this build calls it: the same bits by
// construction. Measured in bench/RESULTS.md, "AVX2-only machines".)
//
// Bitwise the same results as the AVX2 build, so that a run does not change its bits when it
// moves between machines with and without AVX-512: the float32 statistics keep the lane contract
// of segment_kernels.h (kStatsLaneBytes: lane j of a chunk sums elements j, j+W, j+2W, ... in
// order, then the lanes are added in lane order, then the tail), a 512-bit step simply does two
// lane sets one after the other; the combine computes fma(alpha, a, beta*b) in float per element
// and rounds it exactly as the AVX2 build does (ATen's round-to-nearest-even with NaN -> 0xFFFF
// for bf16 vectors, F16C's conversion for fp16), and splits every chunk into vector blocks and
// scalar head/tail at the same element positions, so that even NaN payloads agree.
// float64 uses the AVX2 kernels: its products are not exact and nothing would be gained.
//
// Unlike segment_kernels_avx2.cpp this file includes every header before switching the target
// (push_options/pop_options around its own code only): inline functions of the torch headers are
// compiled for the baseline ISA, so the linker can never pick an AVX-512 copy of one of them for
// code that runs on a CPU without AVX-512.
#include "segment_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c,prfchw")

namespace pareto_lora {
namespace avx512 {
namespace {

// One prefetch per cache line and stream, kPrefetchBytes ahead (segment_kernels.h).
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// Lines of out written with plain stores are read first: fetch them ahead with intent to write
// (prefetchw: every AVX-512 CPU has it). Measured with caches evicted between calls, 1M elements,
// 1 thread: 5-13% faster; 2 threads 0-5%.
inline void prefetch_for_write(void* p) { __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes, 1, 3); }

// vcvtps2pd with its memory operand kept (8 floats -> 8 doubles): GCC would otherwise forward
// the widened floats from the stack buffer through registers (an extract on the shuffle port).
inline __m512d cvtps2pd_mem(const float* p) {
  __m512d r;
  asm("vcvtps2pd %1, %0" : "=v"(r) : "m"(*reinterpret_cast<const __m256*>(p)));
  return r;
}

// One lane set (32 bytes, zero-extended) or two (64 bytes) of 16-bit elements at p.
inline __m512i load_sets(const void* p, int sets) {
  return sets == 2 ? _mm512_loadu_si512(p) : _mm512_zextsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}

// bf16 pairs: the low half of each 32-bit word is an even element, the high half an odd one; a
// shift (even) or a mask (odd) makes floats of them without the shuffle port.
inline __m512 bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 bf16_odd(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(~0xFFFF))); }

// A dtype's way into float lanes (float32 only since bf16/fp16 statistics use the AVX2 kernel;
// kept as a policy so that the lane bookkeeping stays in one place). widen() turns one or two lane sets (kW elements each) at p into
// floats and returns where they are; the doubles of accumulator k for lane set `set` are the 8
// floats at offset(set, k); slot(j) is where lane j sits among the kAcc x 8 stored accumulator
// lanes.
struct F32 {
  using T = float;
  static constexpr int64_t kW = kStatsLaneBytes / sizeof(T);
  static constexpr int kAcc = 1;
  static const float* widen(const T* p, float*, int) { return p; }
  static constexpr int offset(int set, int) { return 8 * set; }
  static constexpr int slot(int j) { return j; }
};

// Statistics in double lanes (exact products: see segment_kernels.inc), two lane sets per step.
template <class P>
void chunk_stats(const void* va, const void* vb, int64_t n, double* out3) {
  using T = typename P::T;
  constexpr int K = P::kAcc;
  constexpr int64_t W = P::kW;
  static_assert(W == 8 * K, "each accumulator holds 8 double lanes");
  const T* a = static_cast<const T*>(va);
  const T* b = static_cast<const T*>(vb);
  __m512d saa[K], sbb[K], sab[K];
  for (int k = 0; k < K; ++k) saa[k] = sbb[k] = sab[k] = _mm512_setzero_pd();
  alignas(64) float fa[32], fb[32];
  auto step = [&](int64_t i, int sets) {
    const float* xa = P::widen(a + i, fa, sets);
    const float* xb = P::widen(b + i, fb, sets);
    for (int set = 0; set < sets; ++set) {  // lane set 0 before lane set 1: each lane's order
      for (int k = 0; k < K; ++k) {
        const __m512d x = cvtps2pd_mem(xa + P::offset(set, k));
        const __m512d y = cvtps2pd_mem(xb + P::offset(set, k));
        saa[k] = _mm512_fmadd_pd(x, x, saa[k]);
        sbb[k] = _mm512_fmadd_pd(y, y, sbb[k]);
        sab[k] = _mm512_fmadd_pd(x, y, sab[k]);
      }
    }
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {  // 2W elements = 64 bytes: one line per stream
    prefetch_ahead(a + i);
    prefetch_ahead(b + i);
    step(i, 2);
  }
  if (i + W <= n) {
    step(i, 1);
    i += W;
  }
  alignas(64) double lanes[3][8 * K];
  for (int k = 0; k < K; ++k) {
    _mm512_store_pd(lanes[0] + 8 * k, saa[k]);
    _mm512_store_pd(lanes[1] + 8 * k, sbb[k]);
    _mm512_store_pd(lanes[2] + 8 * k, sab[k]);
  }
  double acc[3] = {0.0, 0.0, 0.0};
  for (int j = 0; j < W; ++j) {
    for (int s = 0; s < 3; ++s) acc[s] += lanes[s][P::slot(j)];
  }
  for (; i < n; ++i) {
    const double x = static_cast<double>(static_cast<float>(a[i]));
    const double y = static_cast<double>(static_cast<float>(b[i]));
    acc[0] += x * x;
    acc[1] += y * y;
    acc[2] += x * y;
  }
  out3[0] = acc[0];
  out3[1] = acc[1];
  out3[2] = acc[2];
}

// ---- combine: one (32 bytes of out) or two (64 bytes) blocks of out = fma(alpha, a, beta*b) ----

template <bool kStream>
inline void put(void* p, __m512i v) {
  if constexpr (kStream) {
    _mm512_stream_si512(static_cast<__m512i*>(p), v);
  } else {
    _mm512_storeu_si512(p, v);
  }
}

template <bool kStream>
inline void put(void* p, __m256i v) {
  if constexpr (kStream) {
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  }
}

struct Coef {
  __m512 al, be;
};

inline __m512 lincomb(const Coef& c, __m512 x, __m512 y) { return _mm512_fmadd_ps(c.al, x, _mm512_mul_ps(c.be, y)); }

template <bool kStream>
void block(const float* a, const float* b, float* out, int sets, const Coef& c) {
  if (sets == 2) {
    put<kStream>(out, _mm512_castps_si512(lincomb(c, _mm512_loadu_ps(a), _mm512_loadu_ps(b))));
  } else {
    const __m256 r = _mm256_fmadd_ps(_mm512_castps512_ps256(c.al), _mm256_loadu_ps(a),
                                     _mm256_mul_ps(_mm512_castps512_ps256(c.be), _mm256_loadu_ps(b)));
    put<kStream>(out, _mm256_castps_si256(r));
  }
}

// Round to nearest even into the high (odd element) or low (even element) half of each word,
// NaN -> 0xFFFF: ATen's AVX2 cvtfp32_bf16, bit for bit.
template <bool kHigh>
inline __m512i bf16_bits(__m512 r) {
  const __m512i u = _mm512_castps_si512(r);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i t = _mm512_add_epi32(_mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)), u);
  const __mmask16 ordered = _mm512_cmp_ps_mask(r, r, _CMP_ORD_Q);
  if constexpr (kHigh) {
    return _mm512_mask_mov_epi32(_mm512_set1_epi32(~0xFFFF), ordered, _mm512_and_si512(t, _mm512_set1_epi32(~0xFFFF)));
  } else {
    return _mm512_mask_mov_epi32(_mm512_set1_epi32(0xFFFF), ordered, _mm512_srli_epi32(t, 16));
  }
}

template <bool kStream>
void block(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* out, int sets, const Coef& c) {
  const __m512i x = load_sets(a, sets), y = load_sets(b, sets);
  const __m512i r = _mm512_or_si512(bf16_bits<false>(lincomb(c, bf16_even(x), bf16_even(y))),
                                    bf16_bits<true>(lincomb(c, bf16_odd(x), bf16_odd(y))));
  if (sets == 2) {
    put<kStream>(out, r);
  } else {
    put<kStream>(out, _mm512_castsi512_si256(r));
  }
}

template <bool kStream>
void block(const c10::Half* a, const c10::Half* b, c10::Half* out, int sets, const Coef& c) {
  for (int s = 0; s < sets; ++s) {
    const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * s)));
    const __m512 y = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 * s)));
    put<kStream>(out + 16 * s, _mm512_cvtps_ph(lincomb(c, x, y), _MM_FROUND_TO_NEAREST_INT));
  }
}

// The same element positions as the AVX2 chunk_combine: with streaming stores a scalar head up to
// the first 32-byte aligned element of out, then blocks of 32 bytes of out (here two at a time
// once out is 64-byte aligned), then a scalar tail. The scalar head and tail compute what the
// AVX2 build's do (fma in float, c10's rounding).
template <typename T, bool kStream>
void combine_run(const T* a, const T* b, T* out, int64_t n, float al, float be) {
  constexpr int64_t W = kStatsLaneBytes / sizeof(T);  // elements per 32-byte block
  const Coef c{_mm512_set1_ps(al), _mm512_set1_ps(be)};
  auto scalar = [&](int64_t j) {
    out[j] = static_cast<T>(std::fma(al, static_cast<float>(a[j]), be * static_cast<float>(b[j])));
  };
  int64_t i = 0;
  if constexpr (kStream) {
    for (; i < n && (reinterpret_cast<uintptr_t>(out + i) & 31) != 0; ++i) scalar(i);
    if (i + W <= n && (reinterpret_cast<uintptr_t>(out + i) & 63) != 0) {
      block<kStream>(a + i, b + i, out + i, 1, c);
      i += W;
    }
  }
  // reads of a/b at i precede the write of out at i, so out may alias a or b
  for (; i + 2 * W <= n; i += 2 * W) {
    prefetch_ahead(a + i);
    prefetch_ahead(b + i);
    if constexpr (!kStream) prefetch_for_write(out + i);
    block<kStream>(a + i, b + i, out + i, 2, c);
  }
  if (i + W <= n) {
    block<kStream>(a + i, b + i, out + i, 1, c);
    i += W;
  }
  for (; i < n; ++i) scalar(i);
  if constexpr (kStream) _mm_sfence();  // order the weakly-ordered streaming stores before the caller's barrier
}

template <typename T>
void chunk_combine(const void* va, const void* vb, void* vo, int64_t n, double alpha, double beta, bool stream) {
  const T* a = static_cast<const T*>(va);
  const T* b = static_cast<const T*>(vb);
  T* out = static_cast<T*>(vo);
  const float al = static_cast<float>(alpha), be = static_cast<float>(beta);
  if (stream) {
    combine_run<T, true>(a, b, out, n, al, be);
  } else {
    combine_run<T, false>(a, b, out, n, al, be);
  }
}

}  // namespace

// float64, bf16 and fp16 statistics go through the AVX2 table (see the top of this file).
void stats_f64(const void* a, const void* b, int64_t n, double* out3) { avx2::kernels.by_dtype[1].stats(a, b, n, out3); }
void stats_bf16(const void* a, const void* b, int64_t n, double* out3) { avx2::kernels.by_dtype[2].stats(a, b, n, out3); }
void stats_f16(const void* a, const void* b, int64_t n, double* out3) { avx2::kernels.by_dtype[3].stats(a, b, n, out3); }

void combine_f64(const void* a, const void* b, void* out, int64_t n, double alpha, double beta, bool stream) {
  avx2::kernels.by_dtype[1].combine(a, b, out, n, alpha, beta, stream);
}

// Same order as ChunkKernels::by_dtype.
const ChunkKernels kernels = {{{&chunk_stats<F32>, &chunk_combine<float>},
                               {&stats_f64, &combine_f64},
                               {&stats_bf16, &chunk_combine<c10::BFloat16>},
                               {&stats_f16, &chunk_combine<c10::Half>}}};

}  // namespace avx512
}  // namespace pareto_lora

#pragma GCC pop_options
#endif

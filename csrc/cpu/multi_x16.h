// The AVX2 build's 16-bit paths of the K-objective CPU kernels (multi_kernels.cpp): fp16 through
// F16C and bf16 by shifts, 8 elements at a time. c10's portable fp16 conversions cost ~20
// instructions per element (the fp16 combine ran 20x slower than the two-objective one: 16M
// elements, K = 2), and GCC's vectorisation of the bf16 ones left that combine at 1.4-2.6x the copy
// floor. The conversions are exact (16-bit -> float) or round to nearest even (float -> 16-bit),
// as c10's; bf16 NaN becomes 0x7FC0, as in c10. x86-64 with GCC only (target attributes).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#define PL_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

namespace pareto_lora {
namespace multi_x16 {

// fp16 -> double for the Gram's blocks (multi_kernels.cpp widen_block).
PL_AVX2_TARGET inline void widen_f16c(const c10::Half* src, double* dst, int64_t m) {
  int64_t e = 0;
  for (; e + 8 <= m; e += 8) {
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e)));
    _mm256_storeu_pd(dst + e, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
    _mm256_storeu_pd(dst + e + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
  }
  for (; e < m; ++e) dst[e] = static_cast<double>(static_cast<float>(src[e]));
}

// 8 fp16 or bf16 as 8 floats, and 8 floats rounded into 8 of them.
template <typename T>
PL_AVX2_TARGET inline __m256 load8(const T* p) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(x);
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
  }
}

template <typename T>
PL_AVX2_TARGET inline void store8(T* p, __m256 v) {
  __m128i r;
  if constexpr (std::is_same_v<T, c10::Half>) {
    r = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  } else {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    u = _mm256_blendv_epi8(u, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    r = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));  // values < 2^16
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
}

// multi_kernels.cpp combine_chunk's arithmetic (acc = c[K-1] g[K-1], then fma down to k = 0) on 8
// fp16 or bf16 at a time; the tail element by element, the same operations.
template <int K, typename T>
PL_AVX2_TARGET void combine_chunk(const T* const* g, T* out, int64_t n, const double* c) {
  float w[K];
  __m256 vw[K];
  for (int k = 0; k < K; ++k) {
    w[k] = static_cast<float>(c[k]);
    vw[k] = _mm256_set1_ps(w[k]);
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // every input at i is read before out at i is written
    __m256 acc = _mm256_mul_ps(vw[K - 1], load8(g[K - 1] + i));
    for (int k = K - 2; k >= 0; --k) acc = _mm256_fmadd_ps(vw[k], load8(g[k] + i), acc);
    store8(out + i, acc);
  }
  for (; i < n; ++i) {
    float acc = w[K - 1] * static_cast<float>(g[K - 1][i]);
    for (int k = K - 2; k >= 0; --k) acc = std::fma(w[k], static_cast<float>(g[k][i]), acc);
    out[i] = static_cast<T>(acc);
  }
}

}  // namespace multi_x16
}  // namespace pareto_lora
#endif

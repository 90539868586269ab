// CPU kernels: per-segment statistics and the per-segment linear combination.
//
// Work is cut into fixed-size chunks that never cross a segment boundary. Each chunk writes
// its partial sums into its own slot, and a segment's slots are added in chunk order, so the
// result does not depend on the thread count or on scheduling (bitwise reproducible).
// Within a chunk the sums run in the input's opmath type (float32 for fp32/bf16/fp16, double
// for double) over several vector lanes; across chunks they run in double.
#include "segment_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <type_traits>
#include <vector>

namespace pareto_lora {
namespace {

using at::vec::Vectorized;

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

// A vector of scalar_t loaded and widened to opmath lanes: one register for float/double,
// two for bf16/fp16 (a Vectorized<BFloat16> holds twice as many elements as Vectorized<float>).
template <typename scalar_t>
struct Lanes {
  using opmath_t = at::opmath_type<scalar_t>;
  using fVec = Vectorized<opmath_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, opmath_t>;
  static constexpr int64_t kWidth = Vectorized<scalar_t>::size();
  static constexpr int kParts = kReduced ? 2 : 1;
  using Parts = std::array<fVec, kParts>;

  static Parts load(const scalar_t* p) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
      return {lo, hi};
    } else {
      return {fVec::loadu(p)};
    }
  }
  static void store(scalar_t* p, const Parts& v) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
};

template <typename scalar_t>
void chunk_stats(const scalar_t* a, const scalar_t* b, int64_t n, double* out3) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using fVec = typename L::fVec;
  std::array<fVec, L::kParts> saa, sbb, sab;
  saa.fill(fVec(0));
  sbb.fill(fVec(0));
  sab.fill(fVec(0));
  int64_t i = 0;
  for (; i + L::kWidth <= n; i += L::kWidth) {
    const auto va = L::load(a + i);
    const auto vb = L::load(b + i);
    for (int k = 0; k < L::kParts; ++k) {
      saa[k] = at::vec::fmadd(va[k], va[k], saa[k]);
      sbb[k] = at::vec::fmadd(vb[k], vb[k], sbb[k]);
      sab[k] = at::vec::fmadd(va[k], vb[k], sab[k]);
    }
  }
  double acc[3] = {0.0, 0.0, 0.0};
  alignas(64) opmath_t lanes[fVec::size()];
  const std::array<const std::array<fVec, L::kParts>*, 3> sums = {&saa, &sbb, &sab};
  for (int s = 0; s < 3; ++s) {
    for (int k = 0; k < L::kParts; ++k) {
      (*sums[s])[k].store(lanes);
      for (int64_t j = 0; j < fVec::size(); ++j) acc[s] += static_cast<double>(lanes[j]);
    }
  }
  for (; i < n; ++i) {
    const opmath_t x = static_cast<opmath_t>(a[i]);
    const opmath_t y = static_cast<opmath_t>(b[i]);
    acc[0] += static_cast<double>(x * x);
    acc[1] += static_cast<double>(y * y);
    acc[2] += static_cast<double>(x * y);
  }
  out3[0] = acc[0];
  out3[1] = acc[1];
  out3[2] = acc[2];
}

template <typename scalar_t>
void chunk_combine(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, double alpha, double beta) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using fVec = typename L::fVec;
  const opmath_t al = static_cast<opmath_t>(alpha), be = static_cast<opmath_t>(beta);
  const fVec val(al), vbe(be);
  int64_t i = 0;
  for (; i + L::kWidth <= n; i += L::kWidth) {
    auto va = L::load(a + i);
    const auto vb = L::load(b + i);
    for (int k = 0; k < L::kParts; ++k) va[k] = at::vec::fmadd(val, va[k], vbe * vb[k]);
    L::store(out + i, va);  // reads of a/b at i precede this write, so out may alias a or b
  }
  for (; i < n; ++i) {
    out[i] = static_cast<scalar_t>(al * static_cast<opmath_t>(a[i]) + be * static_cast<opmath_t>(b[i]));
  }
}

}  // namespace

void segment_stats_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                       float* stats) {
  const std::vector<Chunk> chunks = make_chunks(offsets, num_segments);
  std::vector<double> partial(3 * chunks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "segment_stats_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& ch = chunks[c];
        chunk_stats<scalar_t>(pa + ch.begin, pb + ch.begin, ch.end - ch.begin, &partial[3 * c]);
      }
    });
  });
  std::vector<double> total(3 * num_segments, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int k = 0; k < 3; ++k) total[3 * chunks[c].seg + k] += partial[3 * c + k];
  }
  for (int64_t i = 0; i < 3 * num_segments; ++i) stats[i] = static_cast<float>(total[i]);
}

void combine_cpu(const at::Tensor& a, const at::Tensor& b, const int64_t* offsets, int64_t num_segments,
                 const double* coeffs, at::Tensor& out) {
  const std::vector<Chunk> chunks = make_chunks(offsets, num_segments);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "combine_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& ch = chunks[c];
        chunk_combine<scalar_t>(pa + ch.begin, pb + ch.begin, po + ch.begin, ch.end - ch.begin,
                                coeffs[2 * ch.seg], coeffs[2 * ch.seg + 1]);
      }
    });
  });
}

}  // namespace pareto_lora

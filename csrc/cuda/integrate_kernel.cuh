// The one CUDA/HIP kernel behind all four ops: a persistent, ticket-driven loop over the tiles
// of schedule.h. In the fused plan apply tiles wait for their segment's rule, so one launch does
// reduce, rule and apply; in the two-launch plan nothing waits. Segments of one tile are
// one-pass tiles in both (statistics, rule and combine by one block; the second read comes from
// L1/L2). A grid of one block per tile, hardware-scheduled, was measured slower on an H200
// (1.5x at 128M elements in one segment): the persistent loop keeps its blocks streaming.
//
// Why this mechanism ("last block finalizes" + per-segment ready flags, not a cooperative grid
// barrier): a grid barrier makes every block wait for the slowest segment before any output is
// written and needs a cooperative launch (grid limited to co-resident blocks, unavailable under
// some MPS/graph setups). Here each segment proceeds on its own: the block that finishes its last
// reduce tile computes the coefficients on the device and raises the segment's flag, and apply
// tiles of that segment start while other segments are still being reduced. Large segments are
// split into many tiles that any block can take, so a 100M-element segment next to 1-element
// ones is spread over the whole GPU. Forward progress is argued in schedule.h.
//
// Determinism: each reduce tile writes its partial sums to its own slot (fixed per-thread element
// assignment, fixed shuffle tree); the finalizing block sums the slots of a segment with a fixed
// thread->slot assignment and a fixed tree. No float atomics: the result does not depend on which
// block ran which tile, on the grid size or on timing, only on the tile size (fixed per dtype).
//
// Workspace counters are self-resetting (the last user of each counter zeroes it), so they are
// zero at the start of every launch without a memset, and CUDA-graph replays stay valid.
#pragma once

#include <ATen/cuda/DeviceUtils.cuh>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "../rule.h"
#include "group_rule.cuh"
#include "schedule.h"

namespace pareto_lora {
namespace cuda_kernel {

constexpr int kThreads = 256;
// 16-byte vectors in flight per thread and per operand. With kMinBlocksPerSm blocks resident,
// that is 4 * 2 * 16 B * 512 threads = 64 KiB of loads in flight per SM, more than twice what
// covers DRAM latency at full H100/H200 bandwidth; registers are capped at 128 per thread, where
// sm_90 builds do not spill (at 80 the bf16 apply loop spilled).
constexpr int kUnroll = 4;
constexpr int kMinBlocksPerSm = 2;
// Vectors per thread and operand in one tile: tiles are big enough that the per-tile ticket,
// lookup and block reduction are small next to the 2 x 32 KiB a tile reads.
constexpr int kVecsPerThread = 8;
// Shared scratch is sized for the narrowest warp of the target (C10_WARP_SIZE_LOWER_BOUND: 32 on
// NVIDIA, 64 on CDNA wavefronts, 32 where the width is only known at run time).
// torch < 2.12 has no such macro: 32 is a lower bound of every warp/wavefront width, so the
// scratch is then merely sized for the most warps possible.
#ifndef C10_WARP_SIZE_LOWER_BOUND
#define C10_WARP_SIZE_LOWER_BOUND 32
#endif
constexpr int kMaxWarps = kThreads / C10_WARP_SIZE_LOWER_BOUND;

// Elements per tile.
template <typename scalar_t>
constexpr int64_t tile_elems() {
  return static_cast<int64_t>(kThreads) * kVecsPerThread * (16 / sizeof(scalar_t));
}

template <typename scalar_t>
struct alignas(16) Vec16 {
  scalar_t v[16 / sizeof(scalar_t)];
};

// Workspace words (int32 tensor): ticket (u64, words 0-1), exited (word 2), then three u32
// arrays of `capacity` segments each.
struct Counters {
  unsigned long long* ticket;
  unsigned int* exited;
  unsigned int* arrived;  // reduce tiles of a segment that have written their partial sums
  unsigned int* ready;    // 1 once a segment's coefficients are written (fused launch only)
  unsigned int* applied;  // apply tiles of a segment that have read the coefficients
};

template <typename scalar_t>
struct Params {
  const scalar_t* a;
  const scalar_t* b;
  scalar_t* out;
  cuda_schedule::View sched;
  int64_t ticket_begin, ticket_end;  // this launch runs tickets [ticket_begin, ticket_end)
  double* partials;                  // 3 per reduce tile
  Counters ctr;
  double* stats;           // [G, 3], written by finalizers
  float* coeffs_out;       // [G, 2], written by finalizers when with_rule
  int32_t* cases;          // [G]
  const float* coeff_f;    // coefficients read by apply tiles: float ...
  const double* coeff_d;   // ... or double (combine with float64 coeffs)
  const bool* active;      // [G] or null
  RuleParams rule;
  bool with_rule;   // finalizers compute the rule
  bool fused;       // finalizers raise `ready`, apply tiles wait for it
  bool vec_ok;      // a, b, out share their alignment mod 16 bytes
  GroupJob group;   // group.groups set: the last block out runs the group rules on `stats`
};

// x, y, z summed over the block; the totals are valid in thread 0. Fixed shuffle tree.
template <typename T>
__device__ __forceinline__ void block_sum3(T& x, T& y, T& z) {
  // The shuffle tree and the scratch rows assume whole warps that fit the scratch. Evaluated per
  // target at compile time: nvcc (32 lanes) and tools/compile_hip.py (64-lane gfx90a wavefronts).
  static_assert(kThreads % C10_WARP_SIZE == 0 && kThreads / C10_WARP_SIZE <= kMaxWarps,
                "kThreads must be whole warps that fit the scratch");
  __shared__ T scratch[kMaxWarps][3];
  const int warp_size = C10_WARP_SIZE;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size;
  for (int o = warp_size / 2; o > 0; o >>= 1) {
    x += WARP_SHFL_DOWN(x, o);
    y += WARP_SHFL_DOWN(y, o);
    z += WARP_SHFL_DOWN(z, o);
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
    scratch[warp][0] = x;
    scratch[warp][1] = y;
    scratch[warp][2] = z;
  }
  __syncthreads();
  if (warp == 0) {
    const int num_warps = kThreads / warp_size;
    x = lane < num_warps ? scratch[lane][0] : T(0);
    y = lane < num_warps ? scratch[lane][1] : T(0);
    z = lane < num_warps ? scratch[lane][2] : T(0);
    for (int o = warp_size / 2; o > 0; o >>= 1) {
      x += WARP_SHFL_DOWN(x, o);
      y += WARP_SHFL_DOWN(y, o);
      z += WARP_SHFL_DOWN(z, o);
    }
  }
}

__device__ __forceinline__ void spin_pause() {
#if defined(USE_ROCM)
  __builtin_amdgcn_s_sleep(2);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  __nanosleep(200);
#endif
}

// Runs f(x_index_in_tile, vector_or_scalar...) over a tile: vectors first (kUnroll loads in
// flight per operand), then the scalar head and tail. Every thread visits a fixed set of elements
// in a fixed order.
template <typename scalar_t, typename VecFn, typename ScalarFn>
__device__ __forceinline__ void for_tile(const scalar_t* a, const scalar_t* b, const cuda_schedule::Split& sp,
                                         int64_t n, VecFn&& on_vec, ScalarFn&& on_scalar) {
  using V = Vec16<scalar_t>;
  const V* va = reinterpret_cast<const V*>(a + sp.head);
  const V* vb = reinterpret_cast<const V*>(b + sp.head);
  for (int64_t base = 0; base < sp.num_vec; base += static_cast<int64_t>(kThreads) * kUnroll) {
    V ra[kUnroll], rb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      if (i < sp.num_vec) {
        ra[u] = va[i];
        rb[u] = vb[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      if (i < sp.num_vec) on_vec(i, ra[u], rb[u]);
    }
  }
  for (int64_t i = threadIdx.x; i < sp.head; i += kThreads) on_scalar(i, a[i], b[i]);
  for (int64_t i = sp.tail_begin + threadIdx.x; i < n; i += kThreads) on_scalar(i, a[i], b[i]);
}

// Thread 0 only: a segment's statistics, and its rule when asked; returns the coefficients as
// apply tiles read them (rounded to float). `raise_flag`: release the segment's apply tiles
// (fused plan). Out of line: it runs once per segment, and its double-precision rule must not
// take registers from the streaming loops.
template <typename scalar_t>
__device__ __noinline__ float2 write_segment(const Params<scalar_t>& p, int64_t seg, double x, double y, double z,
                                             bool raise_flag) {
  // The rule sees the float64 statistics it returns, exactly as on the CPU and in the reference.
  p.stats[3 * seg] = x;
  p.stats[3 * seg + 1] = y;
  p.stats[3 * seg + 2] = z;
  float2 c2 = make_float2(0.f, 0.f);
  if (p.with_rule) {
    const bool on = p.active == nullptr || p.active[seg];
    const Coefficients c = compute_rule(x, y, z, on, p.rule);
    c2 = make_float2(static_cast<float>(c.alpha), static_cast<float>(c.beta));
    p.coeffs_out[2 * seg] = c2.x;
    p.coeffs_out[2 * seg + 1] = c2.y;
    p.cases[seg] = c.code;
    if (raise_flag) {
      __threadfence();  // coefficients visible before the flag
      atomicExch(&p.ctr.ready[seg], 1u);
    }
  }
  return c2;
}

// The last reduce tile of a segment: sum its slots in a fixed order, then the rule.
template <typename scalar_t>
__device__ __noinline__ void finalize_segment(const Params<scalar_t>& p, const cuda_schedule::Tile& t) {
  double x = 0, y = 0, z = 0;
  for (int64_t i = threadIdx.x; i < t.run_tiles; i += kThreads) {
    // volatile: the slots were written by other blocks; do not let a stale L1 line answer.
    const volatile double* s = p.partials + 3 * (t.run_first_slot + i);
    x += s[0];
    y += s[1];
    z += s[2];
  }
  block_sum3(x, y, z);
  // Only segments with apply tiles have someone to consume (and reset) the flag.
  if (threadIdx.x == 0) write_segment(p, t.seg, x, y, z, p.fused && !t.seg_empty);
}

// ||a||^2, ||b||^2, a.b of one tile, summed over the block (valid in thread 0).
template <typename scalar_t>
__device__ __forceinline__ void tile_stats(const Params<scalar_t>& p, const cuda_schedule::Tile& t, double& aa,
                                           double& bb, double& ab) {
  // Products and sums in double: a float32 product is exact in double, so squares of tiny
  // (|x| ~ 1e-23) and huge (|x| ~ 1e20) gradients survive. The tile loop stays memory-bound.
  using acc_t = double;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t n = t.end - t.begin;
  const scalar_t* a = p.a + t.begin;
  const scalar_t* b = p.b + t.begin;
  const cuda_schedule::Split sp =
      cuda_schedule::split_tile(reinterpret_cast<uint64_t>(a), n, sizeof(scalar_t), p.vec_ok);
  aa = 0, bb = 0, ab = 0;
  for_tile<scalar_t>(
      a, b, sp, n,
      [&](int64_t, const Vec16<scalar_t>& x, const Vec16<scalar_t>& y) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const acc_t u = static_cast<acc_t>(x.v[j]), w = static_cast<acc_t>(y.v[j]);
          aa += u * u;
          bb += w * w;
          ab += u * w;
        }
      },
      [&](int64_t, scalar_t x, scalar_t y) {
        const acc_t u = static_cast<acc_t>(x), w = static_cast<acc_t>(y);
        aa += u * u;
        bb += w * w;
        ab += u * w;
      });
  block_sum3(aa, bb, ab);
}

// A reduce tile's partial sums into its slot; the block that brings a segment's last one in
// finalizes the segment.
template <typename scalar_t>
__device__ __forceinline__ void arrive(const Params<scalar_t>& p, const cuda_schedule::Tile& t, double aa, double bb,
                                       double ab) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    double* slot = p.partials + 3 * t.slot;
    slot[0] = aa;
    slot[1] = bb;
    slot[2] = ab;
    // Release: the partial sums must be visible device-wide before the arrival is counted;
    // without this fence the finalizer could read a stale slot.
    __threadfence();
    const unsigned int before = atomicAdd(&p.ctr.arrived[t.seg], 1u);
    last = before + 1 == static_cast<unsigned int>(t.run_tiles);
    if (last) p.ctr.arrived[t.seg] = 0;  // every arrival is in: reset for the next launch
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // acquire side of the fence above
  finalize_segment(p, t);
}

// Thread 0 of an apply tile: wait for the segment's rule (fused plan) and read its coefficients.
template <typename scalar_t>
__device__ __forceinline__ void read_coefficients(const Params<scalar_t>& p, const cuda_schedule::Tile& t,
                                                  at::opmath_type<scalar_t>* coef) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.fused) {
    while (atomicAdd(&p.ctr.ready[t.seg], 0u) == 0u) spin_pause();
    __threadfence();
  }
  if (p.coeff_f != nullptr) {
    const volatile float* c = p.coeff_f + 2 * t.seg;
    coef[0] = static_cast<acc_t>(c[0]);
    coef[1] = static_cast<acc_t>(c[1]);
  } else {
    const volatile double* c = p.coeff_d + 2 * t.seg;
    coef[0] = static_cast<acc_t>(c[0]);
    coef[1] = static_cast<acc_t>(c[1]);
  }
  if (p.fused) {
    // Each apply tile passed the flag before counting itself, so the last one may clear it.
    const unsigned int before = atomicAdd(&p.ctr.applied[t.seg], 1u);
    if (before + 1 == static_cast<unsigned int>(t.run_tiles)) {
      p.ctr.applied[t.seg] = 0;
      p.ctr.ready[t.seg] = 0;
    }
  }
}

// out = alpha*a + beta*b over one tile.
template <typename scalar_t>
__device__ __forceinline__ void apply_range(const Params<scalar_t>& p, const cuda_schedule::Tile& t,
                                            at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t> beta) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t n = t.end - t.begin;
  const scalar_t* a = p.a + t.begin;
  const scalar_t* b = p.b + t.begin;
  scalar_t* out = p.out + t.begin;
  using V = Vec16<scalar_t>;
  const cuda_schedule::Split sp =
      cuda_schedule::split_tile(reinterpret_cast<uint64_t>(a), n, sizeof(scalar_t), p.vec_ok);
  V* vo = reinterpret_cast<V*>(out + sp.head);
  // out may be a or b: each element is read (into registers) before the same thread writes it.
  for_tile<scalar_t>(
      a, b, sp, n,
      [&](int64_t i, const V& x, const V& y) {
        V r;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          r.v[j] = static_cast<scalar_t>(alpha * static_cast<acc_t>(x.v[j]) + beta * static_cast<acc_t>(y.v[j]));
        }
        vo[i] = r;
      },
      [&](int64_t i, scalar_t x, scalar_t y) {
        out[i] = static_cast<scalar_t>(alpha * static_cast<acc_t>(x) + beta * static_cast<acc_t>(y));
      });
}

// One ticket. The statistics loop and the combine loop each appear once (the kernel's register
// budget is set by one copy of each, as in the two-phase design), shared by the three kinds:
//   reduce:   statistics -> slot (-> finalize the segment if last);
//   apply:    coefficients of the segment -> combine;
//   one-pass: statistics -> rule (thread 0) -> combine. Bitwise what reduce + apply tiles give:
//             their finalizer adds the segment's one slot to zero, and apply tiles read the
//             coefficients rounded to float.
template <typename scalar_t>
__device__ __forceinline__ void run_tile(const Params<scalar_t>& p, int64_t ticket) {
  using acc_t = at::opmath_type<scalar_t>;
  const cuda_schedule::Tile t = cuda_schedule::decode(p.sched, ticket);
  __shared__ acc_t coef[2];
  if (t.phase != cuda_schedule::kPhaseApply) {
    double aa, bb, ab;
    tile_stats(p, t, aa, bb, ab);
    if (t.phase == cuda_schedule::kPhaseReduce) {
      arrive(p, t, aa, bb, ab);
      return;
    }
    if (threadIdx.x == 0) {
      double x = 0, y = 0, z = 0;
      x += aa;
      y += bb;
      z += ab;
      const float2 c = write_segment(p, t.seg, x, y, z, /*raise_flag=*/false);
      coef[0] = static_cast<acc_t>(c.x);
      coef[1] = static_cast<acc_t>(c.y);
    }
  } else if (threadIdx.x == 0) {
    read_coefficients(p, t, coef);
  }
  __syncthreads();
  apply_range(p, t, coef[0], coef[1]);
  __syncthreads();  // coef is rewritten by the next tile of this block
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) integrate_kernel(const Params<scalar_t> p) {
  // A block draws its next ticket only when it is free. (Drawing it ahead, while the current
  // tile runs, was measured on an H200: no gain at one segment, and in the fused plan up to 1.4x
  // slower at 1024 segments -- a block stuck waiting on an apply tile then holds a reduce ticket
  // that others wait for.)
  __shared__ int64_t ticket;
  while (true) {
    if (threadIdx.x == 0) ticket = p.ticket_begin + static_cast<int64_t>(atomicAdd(p.ctr.ticket, 1ull));
    __syncthreads();
    const int64_t t = ticket;
    __syncthreads();  // everyone has read `ticket` before thread 0 draws the next one
    if (t >= p.ticket_end) break;
    run_tile(p, t);
  }
  __shared__ bool last;
  if (threadIdx.x == 0) {
    // Every block has drawn its last ticket before it counts itself out, so the last one out may
    // reset the ticket counter for the next launch on this workspace. The fence also publishes
    // this block's statistics to the last block (the group epilogue reads them).
    __threadfence();
    last = atomicAdd(p.ctr.exited, 1u) + 1 == gridDim.x;
    if (last) {
      *p.ctr.ticket = 0;
      *p.ctr.exited = 0;
    }
  }
  if (p.group.groups != nullptr) {  // the same for every block of the launch
    __syncthreads();
    if (last) {
      __threadfence();
      group_rules(p.group, p.stats);
    }
  }
}

// The rule alone (rule_coefficients on CUDA): one thread per segment.
template <typename stat_t>
__global__ void __launch_bounds__(kThreads)
    rule_kernel(const stat_t* stats, const bool* active, int64_t num_segments, RuleParams rule, float* coeffs,
                int32_t* cases) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (s >= num_segments) return;
  const Coefficients c = compute_rule(static_cast<double>(stats[3 * s]), static_cast<double>(stats[3 * s + 1]),
                                      static_cast<double>(stats[3 * s + 2]), active == nullptr || active[s], rule);
  coeffs[2 * s] = static_cast<float>(c.alpha);
  coeffs[2 * s + 1] = static_cast<float>(c.beta);
  cases[s] = c.code;
}

}  // namespace cuda_kernel
}  // namespace pareto_lora

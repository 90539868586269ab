// CUDA semantics for host C++: what csrc/cuda's kernels use, so that g++ compiles the real kernel
// headers and tools/cuda_emu/runtime.cpp runs them on the CPU. Force-included (-include) before
// any kernel header; tools/cuda_emu/shim/ is first on the include path, so its
// ATen/cuda/DeviceUtils.cuh shadows torch's.
//
// Execution model (runtime.cpp): a block is one OS thread, its CUDA threads are fibers switched
// cooperatively. Barriers (__syncthreads, the warp shuffles) and atomics are the switch points;
// the runtime reports a barrier reached by part of a block, a mismatch of call sites, a warp
// shuffle with a lane gone, and a launch past its deadline, instead of hanging.
#pragma once

// Every standard and torch header first: the keyword macros below (__noinline__ above all, which
// GCC's own headers use inside __attribute__) must not reach them.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// The warp width the kernels are compiled and run with: 32 (NVIDIA) or 64 (CDNA wavefronts, as
// tools/compile_hip.py compiles them for gfx90a). torch's non-ROCm headers fix 32; replaced here.
#ifndef CUDA_EMU_WARP_SIZE
#define CUDA_EMU_WARP_SIZE 32
#endif
#undef C10_WARP_SIZE
#define C10_WARP_SIZE CUDA_EMU_WARP_SIZE
#undef C10_WARP_SIZE_LOWER_BOUND
#define C10_WARP_SIZE_LOWER_BOUND CUDA_EMU_WARP_SIZE

struct uint3 {
  unsigned int x, y, z;
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace cuda_emu {

struct ThreadCtx {
  uint3 thread_idx, block_idx, block_dim, grid_dim;
};
// The running fiber's indices; set by the scheduler before it switches to a fiber.
extern thread_local const ThreadCtx* tls_ctx;

// Block barrier among the block's live threads; the call site (file, line) of every thread must
// be the same one.
void syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE());
// Warp barrier of the calling warp with an exchange: `value` (size bytes) is replaced by lane
// (lane + delta)'s, or kept where that lane is outside the lane's `width` group.
void shfl_down(void* value, std::size_t size, unsigned int delta, int width, unsigned int mask, const char* file,
               int line);
// Yield point of atomics and fences: another fiber of the block may run (and the launch may be
// aborted) here, as other threads run between a thread's memory operations on a GPU.
void atomic_point();

}  // namespace cuda_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// Per OS thread = per block; fibers of one block share it.
#define __shared__ static thread_local
#define threadIdx (::cuda_emu::tls_ctx->thread_idx)
#define blockIdx (::cuda_emu::tls_ctx->block_idx)
#define blockDim (::cuda_emu::tls_ctx->block_dim)
#define gridDim (::cuda_emu::tls_ctx->grid_dim)
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)

// Global-memory atomics: sequentially consistent (stronger than the GPU's: see docs/cuda.md).
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  ::cuda_emu::atomic_point();
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  ::cuda_emu::atomic_point();
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned int atomicExch(unsigned int* p, unsigned int v) {
  ::cuda_emu::atomic_point();
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
inline void __threadfence() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  ::cuda_emu::atomic_point();
}
inline void __nanosleep(unsigned int) { ::cuda_emu::atomic_point(); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

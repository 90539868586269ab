// Small kernels that check the emulation itself (tests/backends/test_cuda_emulated.py): that its
// shuffles and barriers compute what CUDA's do, and that it reports a broken kernel (a barrier in
// divergent code, mismatched shuffles, a cross-block wait that never ends) instead of hanging.
#include <cstdio>
#include <string>

#include "runtime.h"
// After runtime.h (its shim defines the CUDA keywords these use):
#include <ATen/cuda/DeviceUtils.cuh>

namespace {

struct Result {
  std::string emu;    // the emulation's report ("" if the launch completed)
  std::string wrong;  // a wrong value seen by a kernel that should compute correctly
};

// Per warp: the shuffle tree sums the lane ids; a lane whose source is outside the warp keeps its
// own value; shared memory and __syncthreads carry the warp sums to thread 0.
void shuffle_and_barrier(unsigned int* bad) {
  constexpr unsigned int w = C10_WARP_SIZE;
  __shared__ unsigned int sums[8];
  const unsigned int lane = threadIdx.x % w, warp = threadIdx.x / w;
  const unsigned int shifted = WARP_SHFL_DOWN(lane, 20u);
  if (shifted != (lane + 20 < w ? lane + 20 : lane)) atomicAdd(bad, 1u);
  unsigned int x = lane + 100 * warp;
  for (unsigned int o = w / 2; o > 0; o >>= 1) x += WARP_SHFL_DOWN(x, o);
  if (lane == 0) sums[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (unsigned int v = 0; v < blockDim.x / w; ++v) {
      if (sums[v] != w * (w - 1) / 2 + 100 * w * v) atomicAdd(bad, 1u);
    }
  }
}

// Divergent barriers; `late`: the threads that skip the barrier exit after the others wait
// (else before: the report must not depend on the order).
void partial_barrier(bool late) {
  const bool waits = late ? threadIdx.x < 128 : threadIdx.x >= 128;
  if (waits) __syncthreads();
}

void mismatched_barriers() {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

void mismatched_shuffles() {
  const float v = WARP_SHFL_DOWN(1.0f, threadIdx.x < 16 ? 1u : 2u);
  (void)v;
}

// Block 1 publishes a value and raises a flag; block 0 waits for it (the fused plan's pattern).
void flag_handoff(unsigned int* flag, unsigned int* value, unsigned int* bad, bool raise) {
  if (threadIdx.x != 0) return;
  if (blockIdx.x == 1 && raise) {
    *value = 42;
    __threadfence();
    atomicExch(flag, 1u);
  } else if (blockIdx.x == 0) {
    while (atomicAdd(flag, 0u) == 0u) {
    }
    __threadfence();
    if (*value != 42) atomicAdd(bad, 1u);
  }
}

Result run(int which, double timeout_s) {
  cuda_emu::LaunchConfig c;
  c.grid = 2;
  c.block_threads = 256;
  c.workers = 2;
  c.timeout_s = timeout_s;
  unsigned int bad = 0, flag = 0, value = 0;
  Result r;
  switch (which) {
    case 0: r.emu = cuda_emu::launch(c, [&] { shuffle_and_barrier(&bad); }); break;
    case 1: r.emu = cuda_emu::launch(c, [] { partial_barrier(true); }); break;
    case 2: r.emu = cuda_emu::launch(c, [] { mismatched_barriers(); }); break;
    case 3: r.emu = cuda_emu::launch(c, [] { mismatched_shuffles(); }); break;
    case 4: r.emu = cuda_emu::launch(c, [&] { flag_handoff(&flag, &value, &bad, true); }); break;
    case 5: r.emu = cuda_emu::launch(c, [&] { flag_handoff(&flag, &value, &bad, false); }); break;
    case 6: r.emu = cuda_emu::launch(c, [] { partial_barrier(false); }); break;
    default: r.emu = "selftest: no such case";
  }
  if (bad != 0) r.wrong = std::to_string(bad) + " wrong values";
  return r;
}

}  // namespace

extern "C" {

// 0: the launch completed with correct values; 1: the emulation reported an error; 2: a wrong
// value. The message goes to err.
int emu_selftest(int which, double timeout_s, char* err, int64_t err_len) {
  const Result r = run(which, timeout_s);
  const std::string& msg = r.emu.empty() ? r.wrong : r.emu;
  std::snprintf(err, static_cast<size_t>(err_len), "%s", msg.c_str());
  return r.emu.empty() ? (r.wrong.empty() ? 0 : 2) : 1;
}

}  // extern "C"

// Stand-in for a ROCm torch's c10/hip/HIPException.h, which the CPU torch wheel does not ship
// (tools/compile_hip.py). Same macro names as the real header: hipify keeps the c10::cuda / C10_CUDA
// spellings for extensions. Compile check only: nothing here is linked or run.
#pragma once

#include <c10/util/Exception.h>
#include <hip/hip_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                    \
  do {                                                                          \
    const hipError_t pl_shim_err = (EXPR);                                      \
    TORCH_CHECK(pl_shim_err == hipSuccess, "HIP error: ", hipGetErrorString(pl_shim_err)); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(hipGetLastError())

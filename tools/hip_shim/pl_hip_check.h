// Force-included (-include) into every file tools/compile_hip.py compiles. Device passes only:
// the warp width torch's headers give device code (C10_WARP_SIZE, used by the kernels' shuffles
// and lane arithmetic) must be the target's real wavefront width, 64 on CDNA (gfx90a). A build
// that lost USE_ROCM, or headers that fell back to 32, fail here instead of miscomputing on a GPU.
#pragma once

#include <c10/macros/Macros.h>

#if defined(__HIP_DEVICE_COMPILE__)
#if !defined(__AMDGCN_WAVEFRONT_SIZE)
#error "compile_hip: __AMDGCN_WAVEFRONT_SIZE is not defined in a device pass"
#endif
__device__ inline void pl_hip_check_warp_size() {
  static_assert(C10_WARP_SIZE == __AMDGCN_WAVEFRONT_SIZE, "C10_WARP_SIZE is not the wavefront width");
#if defined(__gfx90a__)
  static_assert(C10_WARP_SIZE == 64, "gfx90a runs 64-lane wavefronts");
#endif
}
#endif

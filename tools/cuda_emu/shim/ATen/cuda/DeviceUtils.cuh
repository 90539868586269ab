// Shadows torch's ATen/cuda/DeviceUtils.cuh for the CPU emulation (tools/cuda_emu/): WARP_SHFL_DOWN
// with its semantics (a lane whose source lane lies outside its `width` group keeps its own value),
// as a barrier of the calling warp only.
#pragma once

#include "../../cuda_emu.h"

// Default arguments as torch's; the call site (GCC's __builtin_FILE/LINE at the caller) tells
// shuffles of different lines apart. Partial masks are not emulated: refused.
template <typename T>
inline T WARP_SHFL_DOWN(T value, unsigned int delta, int width = C10_WARP_SIZE, unsigned int mask = 0xffffffff,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffled values are up to 16 bytes");
  ::cuda_emu::shfl_down(&value, sizeof(T), delta, width, mask, file, line);
  return value;
}

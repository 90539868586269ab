// Stand-in for a ROCm torch's c10/hip/HIPStream.h (see HIPException.h): declarations only, the
// members the host code of csrc/cuda uses, so that it type-checks around the real device code.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <hip/hip_runtime.h>

namespace c10::cuda {

class CUDAStream {
 public:
  hipStream_t stream() const;
  c10::StreamId id() const;
};

CUDAStream getCurrentCUDAStream(c10::DeviceIndex device_index = -1);

}  // namespace c10::cuda

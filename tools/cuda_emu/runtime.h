// The CPU emulation's launch (runtime.cpp): run `body` as the kernel of every thread of a grid.
#pragma once

#include "shim/cuda_emu.h"

namespace cuda_emu {

struct LaunchConfig {
  unsigned int grid = 1;
  unsigned int block_threads = 256;
  unsigned int workers = 4;  // OS threads, each running blocks one after another
  double timeout_s = 20.0;   // the launch fails past this (see runtime.cpp)
  uint64_t seed = 0;         // 0: fibers round robin; else a seeded shuffled order and extra yields
};

// "" on success, else what went wrong (deadlock, barrier mismatch, deadline).
std::string launch(const LaunchConfig& cfg, const std::function<void()>& body);

}  // namespace cuda_emu

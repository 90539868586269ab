// The host side of integrate_kernel launches that needs no torch: the job, the schedule, the
// kernel's Params, the workspace counter layout and the launches (one, or two split at the
// reduce tickets). ops_cuda.cu uploads and launches what this plans; the CPU emulation
// (tools/cuda_emu/) runs the same plan on the CPU, so its tests check this logic as well.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "../rule.h"
#include "integrate_kernel.cuh"
#include "schedule.h"

namespace pareto_lora {
namespace cuda_launch {

// ---- workspace: counters that each launch leaves at zero ----------------------------------------
// int32 words: ticket (2 words), exited, padding, then arrived, ready, applied of `capacity`
// segments each. Zeroed once when allocated (ops_cuda.cu's workspace()).
constexpr int64_t kCounterHeader = 4;

inline int64_t counter_words(int64_t capacity) { return kCounterHeader + 3 * capacity; }
inline int64_t counter_capacity(int64_t num_words) { return (num_words - kCounterHeader) / 3; }

inline cuda_kernel::Counters counters_of(int32_t* ws, int64_t num_words) {
  const int64_t capacity = counter_capacity(num_words);
  auto* words = reinterpret_cast<unsigned int*>(ws);
  return cuda_kernel::Counters{reinterpret_cast<unsigned long long*>(words), words + 2, words + kCounterHeader,
                               words + kCounterHeader + capacity, words + kCounterHeader + 2 * capacity};
}

// ---- the job ---------------------------------------------------------------------------------------
struct Job {
  bool reduce = false;     // compute statistics (phase 1)
  bool with_rule = false;  // ... and the rule
  bool apply = false;      // write out (phase 2)
  bool two_pass = false;
  bool one_pass = true;  // segments of one tile as one-pass tiles (reduce + apply + rule only)
  double* stats = nullptr;
  float* coeffs_out = nullptr;
  int32_t* cases = nullptr;
  const float* coeff_f = nullptr;
  const double* coeff_d = nullptr;
  const bool* active_device = nullptr;  // active on the GPU ...
  const bool* active_host = nullptr;    // ... or on the CPU: copied along with the schedule
  RuleParams rule{Rule::Sum, 0.5, 1.0, false};
  cuda_kernel::GroupJob group;  // group rules in the last block out (a statistics-only job)
};

inline bool is_fused(const Job& job) { return job.reduce && job.apply && !job.two_pass; }

inline bool same_alignment(std::initializer_list<const void*> ptrs, size_t elem_size) {
  const uint64_t first = reinterpret_cast<uint64_t>(*ptrs.begin());
  if (first % elem_size != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uint64_t>(p) % 16 != first % 16) return false;
  }
  return true;
}

// The job's schedule; a host `active` is copied after it (one upload). `max_blocks`: the grid of
// a full launch (resident blocks); in the fused plan a segment's apply tiles trail its reduce
// tiles by about one wave of blocks.
template <typename scalar_t>
cuda_schedule::HostSchedule schedule_for(const Job& job, const int64_t* offsets, int64_t num_segments,
                                         int64_t max_blocks) {
  namespace cs = cuda_schedule;
  const int64_t lag = is_fused(job) ? max_blocks : std::numeric_limits<int64_t>::max();
  const bool one_pass = job.one_pass && job.reduce && job.apply && job.with_rule;
  const int64_t active_words = job.active_host ? cs::ceil_div(num_segments, 8) : 0;
  cs::HostSchedule h = cs::build_schedule(offsets, num_segments, cuda_kernel::tile_elems<scalar_t>(), job.reduce,
                                          job.apply, lag, one_pass, active_words);
  if (job.active_host) {
    std::memcpy(h.buffer.data() + h.extra_begin, job.active_host, static_cast<size_t>(num_segments));
  }
  return h;
}

// Partial-sum doubles the launch needs (3 per reduce tile; at least one slot).
inline int64_t partial_doubles(const cuda_schedule::HostSchedule& h) {
  return 3 * std::max<int64_t>(h.reduce_tickets, 1);
}

// The kernel's parameters; `sched` is h.buffer where the kernel reads it (uploaded on a GPU).
template <typename scalar_t>
cuda_kernel::Params<scalar_t> params_for(const Job& job, const cuda_schedule::HostSchedule& h, const int64_t* sched,
                                         const scalar_t* a, const scalar_t* b, scalar_t* out, double* partials,
                                         const cuda_kernel::Counters& ctr) {
  cuda_kernel::Params<scalar_t> p;
  p.a = a;
  p.b = b;
  p.out = out;
  p.sched = h.view(sched, cuda_kernel::tile_elems<scalar_t>());
  p.ticket_begin = 0;
  p.ticket_end = 0;
  p.partials = partials;
  p.ctr = ctr;
  p.stats = job.stats;
  p.coeffs_out = job.coeffs_out;
  p.cases = job.cases;
  p.coeff_f = job.coeff_f;
  p.coeff_d = job.coeff_d;
  p.active = job.active_host ? reinterpret_cast<const bool*>(sched + h.extra_begin) : job.active_device;
  p.rule = job.rule;
  p.with_rule = job.with_rule;
  p.fused = is_fused(job);
  p.vec_ok = out ? same_alignment({p.a, p.b, out}, sizeof(scalar_t)) : same_alignment({p.a, p.b}, sizeof(scalar_t));
  p.group = job.group;
  return p;
}

// One kernel launch: tickets [begin, end) on `grid` blocks.
struct Launch {
  int64_t begin, end, grid;
};

// The job's launches in order (at most two: the reduce and one-pass tiles, then the apply tiles,
// when reduce and apply run as two launches; build_schedule put every reduce and one-pass tile
// first). Empty ranges are left out. Returns their number.
inline int launches_for(const Job& job, const cuda_schedule::HostSchedule& h, int64_t max_blocks, Launch out[2]) {
  int n = 0;
  auto add = [&](int64_t begin, int64_t end) {
    if (end > begin) out[n++] = Launch{begin, end, std::min<int64_t>(end - begin, max_blocks)};
  };
  if (job.reduce && job.apply && !is_fused(job)) {
    add(0, h.reduce_tickets);
    add(h.reduce_tickets, h.num_tickets());
  } else {
    add(0, h.num_tickets());
  }
  return n;
}

// The grouped step's group bounds [G+1]: `groups` as given, or (null) each segment its own group.
inline std::vector<int64_t> group_bounds(const int64_t* groups, int64_t num_groups) {
  std::vector<int64_t> bounds(static_cast<size_t>(num_groups + 1));
  for (int64_t i = 0; i <= num_groups; ++i) bounds[static_cast<size_t>(i)] = groups ? groups[i] : i;
  return bounds;
}

}  // namespace cuda_launch
}  // namespace pareto_lora

// CUDA (and, hipified, ROCm) implementations of the pareto_lora ops.
//
// Host side of integrate_kernel.cuh: validation (op_args.h, shared with csrc/cpu/ops_cpu.cpp),
// the tile schedule built on the host from CPU offsets and sent with one non-blocking copy from
// pinned memory, the per-stream workspace of self-resetting counters, and the launch.
//
// No host sync on the hot path: offsets are validated where they already are, on the CPU (the
// training loop keeps them there); offsets passed on the GPU are accepted but cost one blocking
// device->host copy per call. Details and the reasoning: docs/cuda.md.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../op_args.h"
#include "../rule.h"
#include "integrate_kernel.cuh"
#include "launch_plan.h"
#include "schedule.h"

namespace pareto_lora {
namespace {

using cuda_kernel::kThreads;
using cuda_kernel::Params;

// ---- launch plan ---------------------------------------------------------------------------------
// Both plans run the same tiles and produce bitwise-identical results. The fused plan is one
// launch in which apply tiles wait for their segment's rule; the two-launch plan runs the reduce
// (and one-pass) tiles, then the apply tiles. Which one is faster was measured on an
// H200 (bench/sweep_gpu_paths.py, bench/results/gpu_2026-11-28_h200_sweep.txt): at 128M elements
// the two launches are 3-24% faster at every segment count (1..4096), at 16M the two are within
// 5% except with 4096 segments (fused 3-15% faster), at 1M the fused launch saves a few
// microseconds. Hence two launches from 2^25 elements on.
// PARETO_LORA_CUDA_PATH=fused|two_pass forces one (benchmarks, debugging);
// PARETO_LORA_CUDA_ONE_PASS=0 turns the one-pass tiles off (to measure what they bring).
constexpr int64_t kTwoPassMinNumel = int64_t{1} << 25;

bool env_flag(const char* name, bool fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  const std::string v = env;
  TORCH_CHECK_VALUE(v == "0" || v == "1", name, ": expected '0' or '1', got '", v, "'");
  return v == "1";
}

bool use_two_pass(int64_t numel) {
  const char* env = std::getenv("PARETO_LORA_CUDA_PATH");
  const std::string path = env ? env : "auto";
  if (path == "fused") return false;
  if (path == "two_pass") return true;
  TORCH_CHECK_VALUE(path == "auto" || path.empty(),
                    "PARETO_LORA_CUDA_PATH: expected 'fused', 'two_pass' or 'auto', got '", path, "'");
  int64_t threshold = kTwoPassMinNumel;
  if (const char* t = std::getenv("PARETO_LORA_CUDA_TWO_PASS_MIN_NUMEL")) threshold = std::atoll(t);
  return numel >= threshold;
}

// ---- device facts, cached ----------------------------------------------------------------------
template <typename scalar_t>
int resident_blocks(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, cuda_kernel::integrate_kernel<scalar_t>,
                                                               kThreads, 0));
  const int blocks = std::max(1, sms) * std::max(1, per_sm);
  cache.emplace(device, blocks);
  return blocks;
}

// ---- workspace: counters that each launch leaves at zero ----------------------------------------
// One per (device, stream): launches on one stream are ordered, so they can share counters;
// launches on different streams may overlap, so they must not. Zeroed once when (re)allocated.
// The layout: launch_plan.h.
at::Tensor workspace(const at::Device& device, const c10::cuda::CUDAStream& stream, int64_t num_segments) {
  static std::mutex mu;
  static std::map<std::pair<int, int64_t>, at::Tensor> cache;
  const int64_t needed = std::max<int64_t>(num_segments, 1);
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& ws = cache[{device.index(), static_cast<int64_t>(stream.id())}];
  const int64_t capacity = ws.defined() ? cuda_launch::counter_capacity(ws.numel()) : 0;
  if (capacity < needed) {
    const int64_t grown = std::max(needed, 2 * capacity);
    // at::zeros runs on the current stream (= `stream`), ahead of the launch that uses it.
    ws = at::zeros({cuda_launch::counter_words(grown)}, at::TensorOptions().dtype(at::kInt).device(device));
  }
  return ws;
}

// Host vector -> device, through pinned memory and a non-blocking copy: no host sync. The
// caching host allocator keeps the pinned block until the copy has run.
at::Tensor upload(const std::vector<int64_t>& words, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(words.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), words.data(), words.size() * sizeof(int64_t));
  return host.to(device, /*non_blocking=*/true);
}

// ---- the launch ----------------------------------------------------------------------------------
// The plan (schedule, Params, launches) is launch_plan.h's, shared with the CPU emulation.
using cuda_launch::Job;

// Returns false when there was nothing to launch (no tiles).
template <typename scalar_t>
bool launch(const at::Tensor& a, const at::Tensor& b, scalar_t* out, const at::Tensor& offsets_cpu, const Job& job) {
  const at::Device device = a.device();
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t num_segments = offsets_cpu.numel() - 1;
  const int max_blocks = resident_blocks<scalar_t>(device.index());
  const cuda_schedule::HostSchedule h =
      cuda_launch::schedule_for<scalar_t>(job, offsets_cpu.const_data_ptr<int64_t>(), num_segments, max_blocks);
  if (h.num_tickets() == 0) return false;  // G = 0, or an apply-only pass over empty segments
  // Run indices are int32 in the ticket table.
  TORCH_CHECK(h.num_runs < std::numeric_limits<int32_t>::max() &&
                  h.num_tickets() < std::numeric_limits<int32_t>::max(),
              "pareto_lora (CUDA): too many tiles in one call (", h.num_tickets(), ")");
  const at::Tensor sched = upload(h.buffer, device);
  const at::Tensor ws = workspace(device, stream, num_segments);
  const at::Tensor partials = at::empty({cuda_launch::partial_doubles(h)}, a.options().dtype(at::kDouble));
  Params<scalar_t> p = cuda_launch::params_for<scalar_t>(
      job, h, sched.const_data_ptr<int64_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), out,
      partials.data_ptr<double>(), cuda_launch::counters_of(ws.data_ptr<int32_t>(), ws.numel()));
  cuda_launch::Launch launches[2];
  const int n = cuda_launch::launches_for(job, h, max_blocks, launches);
  for (int i = 0; i < n; ++i) {
    p.ticket_begin = launches[i].begin;
    p.ticket_end = launches[i].end;
    cuda_kernel::integrate_kernel<scalar_t>
        <<<static_cast<unsigned int>(launches[i].grid), kThreads, 0, stream.stream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return true;
}

bool dispatch_launch(const at::Tensor& a, const at::Tensor& b, at::Tensor* out, const at::Tensor& offsets_cpu,
                     const Job& job) {
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "pareto_lora_cuda", [&] {
    launched = launch<scalar_t>(a, b, out ? out->mutable_data_ptr<scalar_t>() : nullptr, offsets_cpu, job);
  });
  return launched;
}

// ---- the ops ---------------------------------------------------------------------------------------
at::Tensor segment_stats_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  const SegmentArgs args = checked_stats_args(a, b, offsets, kCudaOp);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor stats = at::empty({args.num_segments, 3}, a.options().dtype(at::kDouble));
  Job job;
  job.reduce = true;
  job.stats = stats.data_ptr<double>();
  dispatch_launch(a, b, nullptr, args.offsets, job);
  return stats;
}

std::tuple<at::Tensor, at::Tensor> rule_coefficients_cuda(const at::Tensor& stats, c10::string_view rule, c10::ArrayRef<double> params,
                                                          const std::optional<at::Tensor>& active) {
  const RuleArgs args = checked_rule_args(stats, rule, params, active, kCudaOp);
  const int64_t g = args.num_segments;
  const c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor s = stats.contiguous();
  at::Tensor act = args.active;
  if (act.defined() && act.is_cpu()) act = act.pin_memory().to(stats.device(), /*non_blocking=*/true);
  at::Tensor coeffs = at::empty({g, 2}, stats.options().dtype(at::kFloat));
  at::Tensor cases = at::empty({g}, stats.options().dtype(at::kInt));
  if (g == 0) return {coeffs, cases};
  const auto stream = c10::cuda::getCurrentCUDAStream(stats.device().index());
  const unsigned int grid = static_cast<unsigned int>(cuda_schedule::ceil_div(g, kThreads));
  const bool* pa = act.defined() ? act.const_data_ptr<bool>() : nullptr;
  if (s.scalar_type() == at::kDouble) {
    cuda_kernel::rule_kernel<double><<<grid, kThreads, 0, stream.stream()>>>(
        s.const_data_ptr<double>(), pa, g, args.rule, coeffs.data_ptr<float>(), cases.data_ptr<int32_t>());
  } else {
    cuda_kernel::rule_kernel<float><<<grid, kThreads, 0, stream.stream()>>>(
        s.const_data_ptr<float>(), pa, g, args.rule, coeffs.data_ptr<float>(), cases.data_ptr<int32_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {coeffs, cases};
}

void combine_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, const at::Tensor& coeffs,
                  at::Tensor out) {
  const SegmentArgs args = checked_combine(a, b, offsets, coeffs, out, kCudaOp);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor c = coeffs.contiguous();
  Job job;
  job.apply = true;
  if (c.scalar_type() == at::kDouble) {
    job.coeff_d = c.const_data_ptr<double>();
  } else {
    job.coeff_f = c.const_data_ptr<float>();
  }
  dispatch_launch(a, b, &out, args.offsets, job);
}

// The training step (groups, poison or given stats): launch 1 computes the statistics and, in
// its last block out, every group's sum, rule and per-segment coefficients (with given
// statistics, a one-block launch does only that); launch 2 is the combine. No host sync: groups
// and a CPU `active` go up with non-blocking copies, poison is read by the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> integrate_grouped(const at::Tensor& a, const at::Tensor& b,
                                                                             at::Tensor& out,
                                                                             const IntegrateArgs& args) {
  const int64_t s = args.num_segments, g = args.num_groups;
  const auto opts = a.options();
  at::Tensor stats = at::empty({s, 3}, opts.dtype(at::kDouble));
  at::Tensor group_stats = at::empty({g, 3}, opts.dtype(at::kDouble));
  at::Tensor coeffs = at::empty({g, 2}, opts.dtype(at::kFloat));
  at::Tensor cases = at::empty({g}, opts.dtype(at::kInt));
  at::Tensor seg_coeffs = at::empty({s, 2}, opts.dtype(at::kFloat));
  const at::Tensor groups =
      upload(cuda_launch::group_bounds(args.groups.defined() ? args.groups_ptr() : nullptr, g), a.device());
  at::Tensor act = args.active;
  if (act.defined() && act.is_cpu()) act = act.pin_memory().to(a.device(), /*non_blocking=*/true);
  cuda_kernel::GroupJob gj;
  gj.groups = groups.const_data_ptr<int64_t>();
  gj.num_groups = g;
  gj.poison = args.poison.defined() ? args.poison.const_data_ptr<bool>() : nullptr;
  gj.active = act.defined() ? act.const_data_ptr<bool>() : nullptr;
  gj.rule = args.rule;
  gj.group_stats = group_stats.data_ptr<double>();
  gj.coeffs = coeffs.data_ptr<float>();
  gj.cases = cases.data_ptr<int32_t>();
  gj.seg_coeffs = seg_coeffs.data_ptr<float>();
  bool ruled = false;
  if (args.stats.defined()) {
    stats.copy_(args.stats);  // returned as given, in a tensor of its own
  } else {
    Job job;
    job.reduce = true;
    job.stats = stats.data_ptr<double>();
    job.group = gj;
    ruled = dispatch_launch(a, b, nullptr, args.offsets, job);
  }
  if (!ruled && g > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream(a.device().index());
    cuda_kernel::group_rule_kernel<<<1, kThreads, 0, stream.stream()>>>(gj, stats.const_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Job combine;
  combine.apply = true;
  combine.coeff_f = seg_coeffs.const_data_ptr<float>();
  dispatch_launch(a, b, &out, args.offsets, combine);
  return {stats, group_stats, coeffs, cases};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> integrate_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, at::Tensor out, c10::string_view rule,
    c10::ArrayRef<double> params, const std::optional<at::Tensor>& active,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& poison,
    const std::optional<at::Tensor>& given_stats) {
  const IntegrateArgs args = checked_integrate(a, b, offsets, out, rule, params, active, groups,
                                               poison, given_stats, kCudaOp);
  const bool two_pass = use_two_pass(a.numel());
  const bool one_pass = env_flag("PARETO_LORA_CUDA_ONE_PASS", true);
  // Everything is checked: from here on writes may happen.
  const c10::cuda::CUDAGuard guard(a.device());
  if (groups.has_value() || poison.has_value() || given_stats.has_value()) return integrate_grouped(a, b, out, args);
  const int64_t g = args.num_segments;
  at::Tensor stats = at::empty({g, 3}, a.options().dtype(at::kDouble));
  at::Tensor coeffs = at::empty({g, 2}, a.options().dtype(at::kFloat));
  at::Tensor cases = at::empty({g}, a.options().dtype(at::kInt));
  Job job;
  job.reduce = job.with_rule = job.apply = true;
  job.two_pass = two_pass;
  job.one_pass = one_pass;
  job.stats = stats.data_ptr<double>();
  job.coeffs_out = coeffs.data_ptr<float>();
  job.cases = cases.data_ptr<int32_t>();
  job.coeff_f = job.coeffs_out;
  job.rule = args.rule;
  // args.active (contiguous) outlives the launch, which reads it or copies it with the schedule.
  if (args.active.defined()) {
    (args.active.is_cpu() ? job.active_host : job.active_device) = args.active.const_data_ptr<bool>();
  }
  dispatch_launch(a, b, &out, args.offsets, job);
  // Each segment is its own group: the group statistics are the statistics (+0.0 + row, the
  // same bits), in a tensor of their own (op outputs may not alias).
  return {stats, stats.clone(), coeffs, cases};
}

}  // namespace

TORCH_LIBRARY_IMPL(pareto_lora, CUDA, m) {
  m.impl("segment_stats", &segment_stats_cuda);
  m.impl("rule_coefficients", &rule_coefficients_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("integrate", &integrate_cuda);
}

}  // namespace pareto_lora

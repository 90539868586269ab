// The CPU emulation's entry points (a C ABI for tools/cuda_emu/emu.py, through ctypes): the real
// kernels of csrc/cuda (integrate_kernel, group_rule_kernel, rule_kernel, the K-objective gram
// and combine_many), launched as csrc/cuda/ops_cuda.cu and multi_ops.cu launch them, with the
// host plan shared with them (csrc/cuda/launch_plan.h, multi_kernels.cuh). Pointers are host
// memory; the schedule is read where build_schedule left it (what a GPU gets by one upload).
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "runtime.h"
// After runtime.h (its shim defines the CUDA keywords these use):
#include "../../csrc/cuda/launch_plan.h"
#include "../../csrc/cuda/multi_kernels.cuh"
#include "../../csrc/cuda/rule_kernels.cuh"

namespace {

using namespace pareto_lora;

enum Dtype : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Mirrored field by field by emu.py's _Job (ctypes.Structure).
struct EmuJob {
  int32_t dtype;
  int32_t reduce, with_rule, apply, two_pass, one_pass;
  int32_t rule_id;
  double params[kNumParams];
  const void* a;
  const void* b;
  void* out;
  const int64_t* offsets;
  int64_t num_segments;
  double* stats;
  float* coeffs_out;
  int32_t* cases;
  const float* coeff_f;
  const double* coeff_d;
  const bool* active;
  int32_t active_on_host;  // 1: copied with the schedule (a CPU tensor), 0: read in place
  // The group epilogue (null groups: none): cuda_kernel::GroupJob's fields.
  const int64_t* groups;
  int64_t num_groups;
  const bool* poison;
  const bool* group_active;
  double* group_stats;
  float* group_coeffs;
  int32_t* group_cases;
  float* seg_coeffs;
  int32_t* workspace;
  int64_t workspace_words;
  int32_t max_blocks, workers;
  double timeout_s;
  uint64_t seed;  // cuda_emu::LaunchConfig::seed
  int32_t launched;  // out: ops_cuda.cu launch()'s result (false: no tiles)
};

int report(const std::string& msg, char* err, int64_t len) {
  if (msg.empty()) return 0;
  std::snprintf(err, static_cast<size_t>(len), "%s", msg.c_str());
  return 1;
}

RuleParams rule_of(const EmuJob& j) {
  const double* q = j.params;
  return RuleParams{static_cast<Rule>(j.rule_id), q[0], q[1], q[2] == 1.0, q[3], q[4], q[5], q[6], q[7], q[8]};
}

cuda_kernel::GroupJob group_of(const EmuJob& j) {
  cuda_kernel::GroupJob g;
  g.groups = j.groups;
  g.num_groups = j.num_groups;
  g.poison = j.poison;
  g.active = j.group_active;
  g.rule = rule_of(j);
  g.group_stats = j.group_stats;
  g.coeffs = j.group_coeffs;
  g.cases = j.group_cases;
  g.seg_coeffs = j.seg_coeffs;
  return g;
}

cuda_emu::LaunchConfig config(const EmuJob& j, int64_t grid, int threads) {
  cuda_emu::LaunchConfig c;
  c.grid = static_cast<unsigned int>(grid);
  c.block_threads = static_cast<unsigned int>(threads);
  c.workers = static_cast<unsigned int>(j.workers);
  c.timeout_s = j.timeout_s;
  c.seed = j.seed;
  return c;
}

// ops_cuda.cu's launch(), with the emulator's launches in place of <<<...>>>.
template <typename scalar_t>
std::string launch(EmuJob& j) {
  cuda_launch::Job job;
  job.reduce = j.reduce;
  job.with_rule = j.with_rule;
  job.apply = j.apply;
  job.two_pass = j.two_pass;
  job.one_pass = j.one_pass;
  job.stats = j.stats;
  job.coeffs_out = j.coeffs_out;
  job.cases = j.cases;
  job.coeff_f = j.coeff_f;
  job.coeff_d = j.coeff_d;
  (j.active_on_host ? job.active_host : job.active_device) = j.active;
  job.rule = rule_of(j);
  if (j.groups != nullptr) job.group = group_of(j);
  const cuda_schedule::HostSchedule h = cuda_launch::schedule_for<scalar_t>(job, j.offsets, j.num_segments, j.max_blocks);
  j.launched = h.num_tickets() > 0;
  if (!j.launched) return "";
  if (cuda_launch::counter_capacity(j.workspace_words) < std::max<int64_t>(j.num_segments, 1)) {
    return "workspace: too small for the segments";
  }
  // NaN where no reduce tile has written: a finalizer that reads a slot too early or out of its
  // run gets NaN statistics, not a plausible zero.
  std::vector<double> partials(static_cast<size_t>(cuda_launch::partial_doubles(h)),
                               std::numeric_limits<double>::quiet_NaN());
  cuda_kernel::Params<scalar_t> p = cuda_launch::params_for<scalar_t>(
      job, h, h.buffer.data(), static_cast<const scalar_t*>(j.a), static_cast<const scalar_t*>(j.b),
      static_cast<scalar_t*>(j.out), partials.data(), cuda_launch::counters_of(j.workspace, j.workspace_words));
  cuda_launch::Launch launches[2];
  const int n = cuda_launch::launches_for(job, h, j.max_blocks, launches);
  for (int i = 0; i < n; ++i) {
    p.ticket_begin = launches[i].begin;
    p.ticket_end = launches[i].end;
    const std::string e = cuda_emu::launch(config(j, launches[i].grid, cuda_kernel::kThreads),
                                           [&] { cuda_kernel::integrate_kernel<scalar_t>(p); });
    if (!e.empty()) return "launch " + std::to_string(i + 1) + " of " + std::to_string(n) + ": " + e;
  }
  return "";
}

template <typename F>
std::string with_dtype(int32_t dtype, const F& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat64: return f(double{});
    case kBFloat16: return f(c10::BFloat16{});
    case kFloat16: return f(c10::Half{});
    default: return "dtype: expected 0..3";
  }
}

}  // namespace

extern "C" {

// The rule id of a name (csrc/rule.h kRuleNames), -1 if unknown.
int emu_rule_id(const char* name) {
  for (int i = 0; i < static_cast<int>(Rule::Count); ++i) {
    if (std::string(name) == kRuleNames[i]) return i;
  }
  return -1;
}

int emu_num_params() { return kNumParams; }
int emu_warp_size() { return C10_WARP_SIZE; }
int64_t emu_tile_elems(int32_t dtype) {
  int64_t t = 0;
  with_dtype(dtype, [&](auto x) {
    t = cuda_kernel::tile_elems<decltype(x)>();
    return std::string();
  });
  return t;
}
int64_t emu_counter_words(int64_t capacity) { return cuda_launch::counter_words(capacity); }
int64_t emu_counter_capacity(int64_t num_words) { return cuda_launch::counter_capacity(num_words); }
int64_t emu_sizeof_job() { return static_cast<int64_t>(sizeof(EmuJob)); }

// One integrate_kernel job (ops_cuda.cu launch()): 0, or 1 with the message in err.
int emu_launch(EmuJob* j, char* err, int64_t err_len) {
  return report(with_dtype(j->dtype, [&](auto x) { return launch<decltype(x)>(*j); }), err, err_len);
}

// group_rule_kernel on one block (ops_cuda.cu integrate_grouped, given statistics).
int emu_group_rule_kernel(EmuJob* j, const double* stats, char* err, int64_t err_len) {
  const cuda_kernel::GroupJob gj = group_of(*j);
  return report(cuda_emu::launch(config(*j, 1, cuda_kernel::kThreads), [&] { cuda_kernel::group_rule_kernel(gj, stats); }),
                err, err_len);
}

// rule_kernel (ops_cuda.cu rule_coefficients_cuda): stats float64 (stats_double) or float32.
int emu_rule_kernel(EmuJob* j, const void* stats, int32_t stats_double, char* err, int64_t err_len) {
  const int64_t g = j->num_segments;
  if (g == 0) return 0;
  const int64_t grid = cuda_schedule::ceil_div(g, cuda_kernel::kThreads);
  const RuleParams rule = rule_of(*j);
  auto body = [&] {
    if (stats_double) {
      cuda_kernel::rule_kernel<double>(static_cast<const double*>(stats), j->active, g, rule, j->coeffs_out, j->cases);
    } else {
      cuda_kernel::rule_kernel<float>(static_cast<const float*>(stats), j->active, g, rule, j->coeffs_out, j->cases);
    }
  };
  return report(cuda_emu::launch(config(*j, grid, cuda_kernel::kThreads), body), err, err_len);
}

// gram (multi_ops.cu gram_cuda): stats [S, K(K+1)/2] float64.
int emu_gram(int32_t dtype, int32_t k, const void* const* grads, const int64_t* offsets, int64_t num_segments,
             double* stats, int32_t workers, double timeout_s, char* err, int64_t err_len) {
  using namespace multi_kernel;
  if (num_segments == 0) return 0;
  EmuJob j{};
  j.workers = workers;
  j.timeout_s = timeout_s;
  const int p = num_pairs(k);
  const TileTable tiles = tile_table(offsets, num_segments);
  std::vector<double> partial(static_cast<size_t>(p * tiles.count), std::numeric_limits<double>::quiet_NaN());
  std::string e = with_dtype(dtype, [&](auto x) {
    using T = decltype(x);
    if (tiles.count == 0) return std::string();
    Ptrs<T> ptrs{};
    for (int i = 0; i < k; ++i) ptrs.g[i] = static_cast<const T*>(grads[i]);
    std::string r;
    with_k(k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      r = cuda_emu::launch(config(j, tiles.count, kMultiThreads),
                           [&] { tile_gram_kernel<K, T>(ptrs, tiles.table.data(), tiles.count, partial.data()); });
    });
    return r;
  });
  if (!e.empty()) return report("tile_gram_kernel: " + e, err, err_len);
  const int64_t items = num_segments * p;
  e = cuda_emu::launch(config(j, cuda_schedule::ceil_div(items, kGramReduceThreads), kGramReduceThreads), [&] {
    gram_reduce_kernel(partial.data(), tiles.first.data(), num_segments, tiles.count, p, stats);
  });
  return report(e.empty() ? e : "gram_reduce_kernel: " + e, err, err_len);
}

// combine_many (multi_ops.cu combine_many_cuda): coeffs [S, K] float64 (coeffs_double) or float32.
int emu_combine_many(int32_t dtype, int32_t k, const void* const* grads, void* out, const int64_t* offsets,
                     int64_t num_segments, const void* coeffs, int32_t coeffs_double, int32_t workers, double timeout_s,
                     char* err, int64_t err_len) {
  using namespace multi_kernel;
  EmuJob j{};
  j.workers = workers;
  j.timeout_s = timeout_s;
  const TileTable tiles = tile_table(offsets, num_segments);
  if (tiles.count == 0) return 0;
  return report(with_dtype(dtype, [&](auto x) {
                  using T = decltype(x);
                  Ptrs<T> ptrs{};
                  for (int i = 0; i < k; ++i) ptrs.g[i] = static_cast<const T*>(grads[i]);
                  std::string r;
                  with_k(k, [&](auto kc) {
                    constexpr int K = decltype(kc)::value;
                    r = cuda_emu::launch(config(j, tiles.count, kMultiThreads), [&] {
                      if (coeffs_double) {
                        combine_many_kernel<K, T, double>(ptrs, static_cast<T*>(out), tiles.table.data(), tiles.count,
                                                          static_cast<const double*>(coeffs));
                      } else {
                        combine_many_kernel<K, T, float>(ptrs, static_cast<T*>(out), tiles.table.data(), tiles.count,
                                                         static_cast<const float*>(coeffs));
                      }
                    });
                  });
                  return r;
                }),
                err, err_len);
}

}  // extern "C"

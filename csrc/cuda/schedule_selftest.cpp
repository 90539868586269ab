// Host check of schedule.h (the CUDA kernel's work layout), runnable without a GPU:
//   c++ -std=c++17 -O1 csrc/cuda/schedule_selftest.cpp -o /tmp/t && /tmp/t
// (tests/backends/test_cuda_schedule.py builds and runs it). Exits non-zero with a message on the first violation.
// Not part of the extension build (setup.py compiles csrc/cuda/*.cu only).
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "schedule.h"

using namespace pareto_lora::cuda_schedule;

namespace {

int g_failures = 0;

void expect(bool ok, const char* what, int64_t a = 0, int64_t b = 0) {
  if (!ok) {
    if (g_failures < 20) std::fprintf(stderr, "FAIL: %s (%lld, %lld)\n", what, (long long)a, (long long)b);
    ++g_failures;
  }
}

std::vector<int64_t> random_offsets(std::mt19937_64& rng, int64_t num_segments, int64_t max_len) {
  std::vector<int64_t> off(num_segments + 1, 0);
  std::uniform_int_distribution<int> kind(0, 9);
  for (int64_t s = 0; s < num_segments; ++s) {
    int64_t len;
    switch (kind(rng)) {
      case 0: len = 0; break;
      case 1: len = 1; break;
      case 2: len = max_len; break;
      default: len = std::uniform_int_distribution<int64_t>(0, max_len)(rng);
    }
    off[s + 1] = off[s] + len;
  }
  return off;
}

void check_schedule(const std::vector<int64_t>& off, int64_t tile, bool reduce, bool apply, int64_t lag,
                    bool one_pass) {
  const int64_t g = static_cast<int64_t>(off.size()) - 1;
  const HostSchedule h = build_schedule(off.data(), g, tile, reduce, apply, lag, one_pass, /*extra_words=*/3);
  const View v = h.view(h.buffer.data(), tile);
  expect(static_cast<int64_t>(h.buffer.size()) == h.extra_begin + 3, "extra words appended");
  const int64_t numel = off[g];
  std::vector<int> covered_reduce(numel, 0), covered_apply(numel, 0);
  std::vector<int64_t> reduce_tiles(g, 0), one_pass_tiles(g, 0), last_reduce_ticket(g, -1), first_apply_ticket(g, -1),
      slots_seen(h.reduce_tickets, 0);
  int64_t brute = 0, one_pass_seen = 0;
  for (int64_t t = 0; t < h.num_tickets(); ++t) {
    while (!(v.runs[kRunWords * brute + kRunBegin] <= t && t < v.runs[kRunWords * brute + kRunEnd])) ++brute;
    expect(v.ticket_run[t] == brute, "ticket table", t, brute);
    const Tile tl = decode(v, t);
    expect(tl.seg >= 0 && tl.seg < g, "segment in range", tl.seg);
    expect(tl.begin >= off[tl.seg] && tl.end <= off[tl.seg + 1] && tl.begin <= tl.end, "tile inside segment", t);
    expect(tl.end - tl.begin <= tile, "tile size", t);
    expect(tl.seg_empty == (off[tl.seg] == off[tl.seg + 1]), "empty segment flag", t);
    if (tl.phase == kPhaseReduce || tl.phase == kPhaseOnePass) {
      expect(reduce, "reduce tile only when asked", t);
      for (int64_t i = tl.begin; i < tl.end; ++i) covered_reduce[i]++;
      ++reduce_tiles[tl.seg];
      last_reduce_ticket[tl.seg] = t;
      expect(tl.slot >= 0 && tl.slot < h.reduce_tickets, "slot in range", tl.slot);
      if (tl.slot >= 0 && tl.slot < h.reduce_tickets) slots_seen[tl.slot]++;
      expect(tl.slot - tl.run_first_slot == t - v.runs[kRunWords * brute + kRunBegin], "slots consecutive in a run", t);
    }
    if (tl.phase == kPhaseOnePass) {
      ++one_pass_seen;
      ++one_pass_tiles[tl.seg];
      expect(one_pass && apply, "one-pass tile only when asked", t);
      expect(tl.begin == off[tl.seg] && tl.end == off[tl.seg + 1] && tl.end > tl.begin, "one-pass = whole segment", t);
      expect(tl.run_tiles == 1, "one-pass run of one tile", t);
    }
    if (tl.phase == kPhaseApply || tl.phase == kPhaseOnePass) {
      expect(apply, "apply tile only when asked", t);
      expect(tl.end > tl.begin, "apply tiles are not empty", t);
      for (int64_t i = tl.begin; i < tl.end; ++i) covered_apply[i]++;
      if (tl.phase == kPhaseApply && first_apply_ticket[tl.seg] < 0) first_apply_ticket[tl.seg] = t;
    }
  }
  expect(one_pass_seen == h.one_pass_tickets, "one-pass count", one_pass_seen, h.one_pass_tickets);
  for (int64_t i = 0; i < numel; ++i) {
    expect(covered_reduce[i] == (reduce ? 1 : 0), "reduce covers every element once", i, covered_reduce[i]);
    expect(covered_apply[i] == (apply ? 1 : 0), "apply covers every element once", i, covered_apply[i]);
  }
  for (int64_t s = 0; s < h.reduce_tickets; ++s) expect(slots_seen[s] == 1, "every slot used once", s);
  for (int64_t s = 0; s < g; ++s) {
    const int64_t len = off[s + 1] - off[s];
    const bool expect_one_pass = reduce && apply && one_pass && len > 0 && len <= tile;
    expect(one_pass_tiles[s] == (expect_one_pass ? 1 : 0), "one-pass exactly for segments of one tile", s, len);
    if (reduce) {
      // Run length is what the kernel uses as the arrival count.
      expect(reduce_tiles[s] == std::max<int64_t>(1, ceil_div(len, tile)), "reduce tiles per segment", s);
    }
    if (reduce && apply && len > 0 && !expect_one_pass) {
      // The deadlock-freedom argument: a segment's apply tiles come after all its reduce tiles.
      expect(first_apply_ticket[s] > last_reduce_ticket[s], "apply after reduce", s, first_apply_ticket[s]);
    }
  }
  if (reduce && apply && lag == std::numeric_limits<int64_t>::max()) {
    for (int64_t r = 0; r < h.num_runs; ++r) {
      const bool is_apply = (v.runs[kRunWords * r + kRunCode] & 3) == kPhaseApply;
      expect(is_apply == (v.runs[kRunWords * r + kRunBegin] >= h.reduce_tickets),
             "two-launch order: reduce and one-pass tickets first", r);
    }
  }
}

void check_split() {
  for (int64_t elem : {2, 4, 8}) {
    for (uint64_t addr = 0; addr < 64; addr += elem) {
      for (int64_t n : {0, 1, 3, 7, 8, 9, 17, 100, 4096}) {
        for (bool vec_ok : {false, true}) {
          const Split s = split_tile(addr, n, elem, vec_ok);
          const int64_t ve = 16 / elem;
          expect(s.head >= 0 && s.head <= n, "head in range", n, s.head);
          expect(s.tail_begin == s.head + s.num_vec * ve && s.tail_begin <= n, "tail begin", n, s.tail_begin);
          expect(n - s.tail_begin < ve || !vec_ok, "tail shorter than a vector", n);
          if (vec_ok) {
            expect(s.head < ve, "head shorter than a vector", n, s.head);
            if (s.num_vec > 0) expect((addr + s.head * elem) % 16 == 0, "vectors aligned", addr, s.head);
          } else {
            expect(s.num_vec == 0, "no vectors when not aligned", n);
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  const int64_t big = std::numeric_limits<int64_t>::max();
  for (int rep = 0; rep < 12; ++rep) {
    const int64_t g = std::uniform_int_distribution<int64_t>(0, 300)(rng);
    const std::vector<int64_t> off = random_offsets(rng, g, rep % 2 ? 100 : 1500);
    for (int64_t tile : {1, 7, 64, 1024}) {
      for (bool one_pass : {false, true}) {
        check_schedule(off, tile, true, false, big, one_pass);
        check_schedule(off, tile, false, true, big, one_pass);
        check_schedule(off, tile, true, true, big, one_pass);
        for (int64_t lag : {0, 1, 5, 100}) check_schedule(off, tile, true, true, lag, one_pass);
      }
    }
  }
  check_schedule({0}, 64, true, true, 4, true);  // G = 0
  check_split();
  if (g_failures) {
    std::fprintf(stderr, "%d failures\n", g_failures);
    return 1;
  }
  std::printf("schedule self-test passed\n");
  return 0;
}

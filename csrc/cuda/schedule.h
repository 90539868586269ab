// Work schedule of the CUDA integration kernel: which tile each ticket stands for.
//
// A segment is cut into tiles of `tile` elements that never cross a segment boundary. There are
// two kinds of tile work:
//   phase 1 (reduce): partial ||a||^2, ||b||^2, a.b of one tile into its own slot; the block
//                     that finishes a segment's last phase-1 tile sums the slots in slot order
//                     (deterministic) and applies the rule;
//   phase 2 (apply):  out = alpha*a + beta*b on one tile, once its segment's rule is known.
// The host lays out all tiles as a list of "runs" (consecutive tiles of one segment and one
// phase) in ticket order. Blocks draw tickets from a global counter, so tickets are handed out
// in increasing order, and every phase-2 run of a segment comes after its phase-1 run: a block
// that waits for a segment has a larger ticket than every phase-1 tile of that segment, and those
// tiles are held by running blocks that never wait. Hence no deadlock, whether or not all blocks
// are resident at once (no cooperative launch needed).
//
// This header is host+device and does not need CUDA: schedule_selftest.cpp checks it on the CPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <limits>
#include <vector>

#include "../rule.h"

namespace pareto_lora {
namespace cuda_schedule {

constexpr int64_t kPhaseReduce = 0;
constexpr int64_t kPhaseApply = 1;

// Device-side view of a schedule. All arrays live in one int64 buffer (one H2D copy).
struct View {
  const int64_t* offsets;    // [G+1] segment boundaries
  const int64_t* run_start;  // [R+1] first ticket of each run; run_start[R] = number of tickets
  const int64_t* run_code;   // [R] segment * 2 + phase
  const int64_t* run_slot;   // [R] phase 1: index of the run's first partial-sum slot
  int64_t num_runs;
  int64_t tile;  // elements per tile
};

struct Tile {
  int64_t seg;
  int64_t phase;
  int64_t begin, end;  // element range
  int64_t slot;        // phase 1: partial-sum slot of this tile
  int64_t run_first_slot;
  int64_t run_tiles;  // tiles of this segment in this phase
};

// Run holding ticket t. Blocks draw increasing tickets, so the run of the previous ticket (hint)
// or the next run nearly always matches: one or two loads instead of a binary search.
PL_HOST_DEVICE inline int64_t find_run(const View& v, int64_t t, int64_t hint) {
  const int64_t* rs = v.run_start;
  int64_t lo = 0;
  if (hint >= 0 && hint < v.num_runs && rs[hint] <= t) {
    if (t < rs[hint + 1]) return hint;
    if (hint + 1 < v.num_runs && t < rs[hint + 2]) return hint + 1;
    lo = hint;
  }
  int64_t hi = v.num_runs;  // invariant: rs[lo] <= t < rs[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (rs[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

PL_HOST_DEVICE inline Tile decode(const View& v, int64_t run, int64_t t) {
  Tile tile;
  const int64_t code = v.run_code[run];
  tile.seg = code >> 1;
  tile.phase = code & 1;
  const int64_t k = t - v.run_start[run];
  const int64_t seg_begin = v.offsets[tile.seg], seg_end = v.offsets[tile.seg + 1];
  tile.begin = seg_begin + k * v.tile;
  tile.end = tile.begin + v.tile < seg_end ? tile.begin + v.tile : seg_end;
  tile.run_first_slot = v.run_slot[run];
  tile.slot = tile.run_first_slot + k;
  tile.run_tiles = v.run_start[run + 1] - v.run_start[run];
  return tile;
}

// How a tile of n elements starting at byte address `addr` splits into a scalar head (up to the
// first 16-byte boundary), 16-byte vectors, and a scalar tail.
struct Split {
  int64_t head;        // elements [0, head) are scalar
  int64_t num_vec;     // then num_vec vectors of vec_elems
  int64_t tail_begin;  // elements [tail_begin, n) are scalar
};

PL_HOST_DEVICE inline Split split_tile(uint64_t addr, int64_t n, int64_t elem_size, bool vec_ok) {
  const int64_t vec_elems = 16 / elem_size;
  Split s;
  s.head = vec_ok ? static_cast<int64_t>((16 - addr % 16) % 16) / elem_size : n;
  if (s.head > n) s.head = n;
  s.num_vec = (n - s.head) / vec_elems;
  s.tail_begin = s.head + s.num_vec * vec_elems;
  return s;
}

// Host-side schedule: the int64 buffer behind a View, and where its sections start.
struct HostSchedule {
  std::vector<int64_t> buffer;
  int64_t num_segments = 0;
  int64_t num_runs = 0;
  int64_t reduce_tickets = 0;  // phase-1 tiles (= partial-sum slots)
  int64_t apply_tickets = 0;   // phase-2 tiles
  int64_t extra_begin = 0;     // first word after the schedule, for caller data (e.g. `active`)

  int64_t num_tickets() const { return reduce_tickets + apply_tickets; }
  int64_t run_start_at() const { return num_segments + 1; }
  int64_t run_code_at() const { return run_start_at() + num_runs + 1; }
  int64_t run_slot_at() const { return run_code_at() + num_runs; }

  View view(const int64_t* base, int64_t tile) const {
    return View{base, base + run_start_at(), base + run_code_at(), base + run_slot_at(), num_runs, tile};
  }
};

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Builds the run list. With `reduce` and `apply`, a segment's phase-2 run is placed once at least
// `lag` tickets have been handed out after its phase-1 run (best effort: by then its phase-1
// tiles are likely finished, so blocks seldom wait, and its data may still sit in L2); the rest
// go at the end. lag = max() puts every phase-2 run after every phase-1 run (the two-launch
// order). Segments get max(1, ceil(len / tile)) phase-1 tiles, so empty segments still get their
// statistics and rule written, and ceil(len / tile) phase-2 tiles. `extra_words` int64 words
// are appended for the caller.
inline HostSchedule build_schedule(const int64_t* offsets, int64_t num_segments, int64_t tile, bool reduce,
                                   bool apply, int64_t lag, int64_t extra_words = 0) {
  struct Run {
    int64_t tickets, code, slot;
  };
  std::vector<Run> runs;
  runs.reserve(static_cast<size_t>((reduce ? num_segments : 0) + (apply ? num_segments : 0)));
  struct Pending {
    int64_t seg, ready_at;
  };
  std::deque<Pending> pending;
  HostSchedule h;
  h.num_segments = num_segments;
  int64_t tickets = 0;
  auto emit_apply = [&](int64_t seg) {
    const int64_t n = ceil_div(offsets[seg + 1] - offsets[seg], tile);
    runs.push_back({n, seg * 2 + kPhaseApply, 0});
    tickets += n;
    h.apply_tickets += n;
  };
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t len = offsets[s + 1] - offsets[s];
    if (reduce) {
      const int64_t n = std::max<int64_t>(1, ceil_div(len, tile));
      runs.push_back({n, s * 2 + kPhaseReduce, h.reduce_tickets});
      tickets += n;
      h.reduce_tickets += n;
    }
    if (apply && len > 0) {
      if (!reduce) {
        emit_apply(s);
      } else {
        const int64_t ready_at = lag > std::numeric_limits<int64_t>::max() - tickets ? std::numeric_limits<int64_t>::max()
                                                                                      : tickets + lag;
        pending.push_back({s, ready_at});
      }
    }
    while (!pending.empty() && pending.front().ready_at <= tickets) {
      emit_apply(pending.front().seg);
      pending.pop_front();
    }
  }
  for (const Pending& p : pending) emit_apply(p.seg);

  h.num_runs = static_cast<int64_t>(runs.size());
  h.extra_begin = h.run_slot_at() + h.num_runs;
  h.buffer.assign(static_cast<size_t>(h.extra_begin + extra_words), 0);
  std::copy(offsets, offsets + num_segments + 1, h.buffer.begin());
  int64_t* rs = h.buffer.data() + h.run_start_at();
  int64_t* rc = h.buffer.data() + h.run_code_at();
  int64_t* rl = h.buffer.data() + h.run_slot_at();
  int64_t start = 0;
  for (int64_t r = 0; r < h.num_runs; ++r) {
    rs[r] = start;
    rc[r] = runs[r].code;
    rl[r] = runs[r].slot;
    start += runs[r].tickets;
  }
  rs[h.num_runs] = start;
  return h;
}

}  // namespace cuda_schedule
}  // namespace pareto_lora

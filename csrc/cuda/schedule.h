// Work schedule of the CUDA integration kernel: which tile each ticket stands for.
//
// A segment is cut into tiles of `tile` elements that never cross a segment boundary. There are
// three kinds of tile work:
//   reduce:   partial ||a||^2, ||b||^2, a.b of one tile into its own slot; the block that
//             finishes a segment's last reduce tile sums the slots in slot order (deterministic)
//             and applies the rule;
//   apply:    out = alpha*a + beta*b on one tile, once its segment's rule is known;
//   one-pass: a segment of one tile, done start to finish by one block: statistics, rule,
//             combine. The second read of the tile is served by L1/L2, so the segment crosses
//             DRAM once (3N bytes, not 5N) and no block waits for another.
// The host lays out all tiles as a list of "runs" (consecutive tiles of one segment and one
// kind) in ticket order, plus a ticket -> run table so that a block finds its tile with two
// dependent loads whatever the number of runs (a binary search over thousands of runs cost more
// than streaming the tile at G = 1024). Blocks draw tickets from a global counter, so tickets are
// handed out in increasing order, and every apply run of a segment comes after its reduce run: a
// block that waits for a segment has a larger ticket than every reduce tile of that segment, and
// those tiles are held by running blocks that never wait. Hence no deadlock, whether or not all
// blocks are resident at once (no cooperative launch needed).
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
constexpr int64_t kPhaseOnePass = 2;
constexpr int64_t kPhaseBits = 2;  // run code = segment << kPhaseBits | phase

// One run: int64 words, adjacent so that a tile's lookup is one cache line.
constexpr int64_t kRunWords = 6;
enum RunWord : int64_t { kRunBegin = 0, kRunEnd, kRunCode, kRunSlot, kRunSegBegin, kRunSegEnd };

// Device-side view of a schedule. All arrays live in one int64 buffer (one H2D copy).
struct View {
  const int64_t* runs;        // [R][kRunWords]
  const int32_t* ticket_run;  // [T] run of each ticket
  int64_t num_runs;
  int64_t tile;  // elements per tile
};

struct Tile {
  int64_t seg;
  int64_t phase;
  int64_t begin, end;  // element range
  int64_t slot;        // reduce / one-pass: partial-sum slot of this tile
  int64_t run_first_slot;
  int64_t run_tiles;  // tiles of this segment in this phase
  bool seg_empty;     // the segment has no elements (so no apply tile will read its rule)
};

PL_HOST_DEVICE inline Tile decode(const View& v, int64_t t) {
  const int64_t* r = v.runs + kRunWords * static_cast<int64_t>(v.ticket_run[t]);
  Tile tile;
  const int64_t code = r[kRunCode];
  tile.seg = code >> kPhaseBits;
  tile.phase = code & ((int64_t{1} << kPhaseBits) - 1);
  const int64_t k = t - r[kRunBegin];
  const int64_t seg_begin = r[kRunSegBegin], seg_end = r[kRunSegEnd];
  tile.begin = seg_begin + k * v.tile;
  tile.end = tile.begin + v.tile < seg_end ? tile.begin + v.tile : seg_end;
  tile.run_first_slot = r[kRunSlot];
  tile.slot = tile.run_first_slot + k;
  tile.run_tiles = r[kRunEnd] - r[kRunBegin];
  tile.seg_empty = seg_end == seg_begin;
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
  int64_t reduce_tickets = 0;  // reduce and one-pass tiles (= partial-sum slots)
  int64_t apply_tickets = 0;   // apply tiles
  int64_t one_pass_tickets = 0;
  int64_t extra_begin = 0;  // first word after the schedule, for caller data (e.g. `active`)

  int64_t num_tickets() const { return reduce_tickets + apply_tickets; }
  int64_t table_at() const { return kRunWords * num_runs; }

  View view(const int64_t* base, int64_t tile) const {
    return View{base, reinterpret_cast<const int32_t*>(base + table_at()), num_runs, tile};
  }
};

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Builds the run list. With `reduce` and `apply`, a segment's apply run is placed once at least
// `lag` tickets have been handed out after its reduce run (best effort: by then its reduce tiles
// are likely finished, so blocks seldom wait, and its data may still sit in L2); the rest go at
// the end. lag = max() puts every apply run after every reduce and one-pass run (the two-launch
// order). With `one_pass` (and reduce and apply), a segment of 1..tile elements is one one-pass
// tile instead of a reduce and an apply tile. Segments get max(1, ceil(len / tile)) reduce tiles,
// so empty segments still get their statistics and rule written, and ceil(len / tile) apply
// tiles. `extra_words` int64 words are appended for the caller.
inline HostSchedule build_schedule(const int64_t* offsets, int64_t num_segments, int64_t tile, bool reduce,
                                   bool apply, int64_t lag, bool one_pass, int64_t extra_words = 0) {
  struct Run {
    int64_t tickets, code, slot, seg;
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
    runs.push_back({n, seg << kPhaseBits | kPhaseApply, 0, seg});
    tickets += n;
    h.apply_tickets += n;
  };
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t len = offsets[s + 1] - offsets[s];
    if (reduce && apply && one_pass && len > 0 && len <= tile) {
      runs.push_back({1, s << kPhaseBits | kPhaseOnePass, h.reduce_tickets, s});
      tickets += 1;
      h.reduce_tickets += 1;
      h.one_pass_tickets += 1;
    } else {
      if (reduce) {
        const int64_t n = std::max<int64_t>(1, ceil_div(len, tile));
        runs.push_back({n, s << kPhaseBits | kPhaseReduce, h.reduce_tickets, s});
        tickets += n;
        h.reduce_tickets += n;
      }
      if (apply && len > 0) {
        if (!reduce) {
          emit_apply(s);
        } else {
          const int64_t ready_at = lag > std::numeric_limits<int64_t>::max() - tickets
                                       ? std::numeric_limits<int64_t>::max()
                                       : tickets + lag;
          pending.push_back({s, ready_at});
        }
      }
    }
    while (!pending.empty() && pending.front().ready_at <= tickets) {
      emit_apply(pending.front().seg);
      pending.pop_front();
    }
  }
  for (const Pending& p : pending) emit_apply(p.seg);

  h.num_runs = static_cast<int64_t>(runs.size());
  const int64_t table_words = ceil_div(tickets, 2);  // int32 entries, two per word
  h.extra_begin = h.table_at() + table_words;
  h.buffer.assign(static_cast<size_t>(h.extra_begin + extra_words), 0);
  int64_t* rw = h.buffer.data();
  int32_t* table = reinterpret_cast<int32_t*>(rw + h.table_at());
  int64_t start = 0;
  for (int64_t r = 0; r < h.num_runs; ++r) {
    int64_t* w = rw + kRunWords * r;
    w[kRunBegin] = start;
    w[kRunEnd] = start + runs[r].tickets;
    w[kRunCode] = runs[r].code;
    w[kRunSlot] = runs[r].slot;
    w[kRunSegBegin] = offsets[runs[r].seg];
    w[kRunSegEnd] = offsets[runs[r].seg + 1];
    std::fill(table + start, table + start + runs[r].tickets, static_cast<int32_t>(r));
    start += runs[r].tickets;
  }
  return h;
}

}  // namespace cuda_schedule
}  // namespace pareto_lora

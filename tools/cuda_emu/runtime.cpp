// The CPU emulation's scheduler (tools/cuda_emu/shim/cuda_emu.h declares what kernels call).
//
// A launch runs its blocks on up to `workers` OS threads at once; a block's threads are fibers with
// their own stacks (guard page below each), switched cooperatively on the block's OS thread, round
// robin, at barriers and atomics. Blocks of one launch really run concurrently, so the kernels'
// cross-block protocols (tickets, counters, flags) run for real. Errors do not hang: a barrier that
// cannot complete (every live fiber of a block blocked, or a thread exiting while others wait),
// call sites that differ at one barrier, a partial shuffle mask, and a launch past its deadline
// abort the launch with a message. A loop that never reaches a barrier or an atomic cannot be
// interrupted: past twice the deadline the watchdog aborts the process (a crash, not a hang).
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <thread>


#include "context.h"
#include "runtime.h"  // last: its shim defines CUDA keywords as macros

namespace cuda_emu {

thread_local const ThreadCtx* tls_ctx = nullptr;

namespace {

constexpr std::size_t kStackBytes = 128 * 1024;

struct Fiber {
  Context ctx;
  ThreadCtx idx;
  int warp = 0, lane = 0;
  enum State { kReady, kSync, kShfl, kDone } state = kReady;
  bool spun = false;  // last yield was an atomic (a spin-wait keeps it ready)
  const char* file = nullptr;
  int line = 0;
};

struct Warp {
  int arrived = 0, exited = 0;
  uint64_t gen = 0;
  const char* file = nullptr;
  int line = 0;
  unsigned int delta = 0;
  int width = 0;
  alignas(16) unsigned char buf[2][CUDA_EMU_WARP_SIZE][16];
};

struct Launch;

struct Block {
  Launch* launch = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, warp_size = 32;
  int sync_arrived = 0;
  const char* sync_file = nullptr;
  int sync_line = 0;
  Fiber* cur = nullptr;
  Context sched;
  bool aborted = false;
  uint64_t rng = 0;  // 0: plain round robin; else xorshift state of the shuffled schedule

  // Next pseudo-random number (xorshift64), or 0 in plain round robin.
  uint64_t next() {
    if (rng == 0) return 0;
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  }
};

thread_local Block* tls_block = nullptr;

struct Launch {
  const std::function<void()>* body;
  LaunchConfig cfg;
  std::atomic<unsigned int> next_block{0};
  std::atomic<bool> abort{false};
  std::chrono::steady_clock::time_point deadline;
  std::mutex mu;
  std::string error;

  void fail(const std::string& msg) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = msg;
    }
    abort.store(true);
  }
};

std::string where(const Fiber& f) {
  std::ostringstream s;
  s << "block " << f.idx.block_idx.x << " thread " << f.idx.thread_idx.x;
  return s.str();
}

std::string site(const char* file, int line) { return std::string(file ? file : "?") + ":" + std::to_string(line); }

// From a fiber: report, and never come back (the scheduler drops the block).
[[noreturn]] void fail_here(const std::string& msg) {
  Block& b = *tls_block;
  b.launch->fail(msg);
  b.aborted = true;
  switch_context(b.cur->ctx, b.sched);
  std::abort();  // not reached: an aborted block's fibers are never resumed
}

void yield_to_scheduler() {
  Block& b = *tls_block;
  switch_context(b.cur->ctx, b.sched);
  if (b.launch->abort.load(std::memory_order_relaxed)) fail_here("");
}

// A fiber's first (and only) frame; it starts as the block's current fiber.
void fiber_main(void*) {
  Block& b = *tls_block;
  Fiber& f = *b.cur;
  (*b.launch->body)();
  f.state = Fiber::kDone;
  --b.live;
  ++b.warps[f.warp].exited;
  if (b.sync_arrived > 0) {
    fail_here(where(f) + " exited while " + std::to_string(b.sync_arrived) + " threads of its block wait at " +
              site(b.sync_file, b.sync_line) + " (__syncthreads reached by part of the block)");
  }
  if (b.warps[f.warp].arrived > 0) {
    fail_here(where(f) + " exited while lanes of its warp wait at the shuffle at " +
              site(b.warps[f.warp].file, b.warps[f.warp].line));
  }
  switch_context(f.ctx, b.sched);
  std::abort();  // a finished fiber is never resumed
}

std::string states(const Block& b) {
  std::ostringstream s;
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == Fiber::kDone || shown >= 6) continue;
    s << (shown++ ? "; " : "") << "thread " << f.idx.thread_idx.x << " at "
      << (f.state == Fiber::kSync ? "__syncthreads " : "WARP_SHFL_DOWN ") << site(f.file, f.line);
  }
  return s.str();
}

void run_block(Block& b, unsigned int block, std::vector<char*>& stacks) {
  Launch& l = *b.launch;
  const int n = static_cast<int>(l.cfg.block_threads);
  b.fibers.assign(static_cast<std::size_t>(n), Fiber{});
  b.warps.assign(static_cast<std::size_t>((n + b.warp_size - 1) / b.warp_size), Warp{});
  b.live = n;
  b.sync_arrived = 0;
  b.aborted = false;
  b.rng = l.cfg.seed == 0 ? 0 : (l.cfg.seed * 0x9E3779B97F4A7C15ull) ^ (block + 1);
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[static_cast<std::size_t>(t)];
    f.idx = ThreadCtx{{static_cast<unsigned int>(t), 0, 0}, {block, 0, 0}, {l.cfg.block_threads, 1, 1}, {l.cfg.grid, 1, 1}};
    f.warp = t / b.warp_size;
    f.lane = t % b.warp_size;
    make_context(f.ctx, stacks[static_cast<std::size_t>(t)], kStackBytes, &fiber_main);
  }
  int spins = 0;
  while (b.live > 0) {
    bool ran = false, all_spun = true;
    // Visit order of this sweep: round robin, or (seeded) from a random start with a random odd
    // stride, which visits every fiber once when the block size is a power of two.
    const uint64_t r = b.next();
    const int start = static_cast<int>(r % static_cast<uint64_t>(n));
    const bool pow2 = (n & (n - 1)) == 0;
    const int stride = pow2 ? static_cast<int>((r >> 32) % static_cast<uint64_t>(n)) | 1 : 1;
    for (int i = 0; i < n; ++i) {
      Fiber& f = b.fibers[static_cast<std::size_t>((start + i * stride) % n)];
      if (f.state != Fiber::kReady) continue;
      ran = true;
      f.spun = false;
      b.cur = &f;
      tls_ctx = &f.idx;
      switch_context(b.sched, f.ctx);
      if (b.aborted) return;
      all_spun = all_spun && f.spun;
    }
    if (l.abort.load()) return;
    if (!ran) {
      l.fail("deadlock in block " + std::to_string(block) + ": every live thread waits at a barrier that cannot "
             "complete (" + states(b) + ")");
      return;
    }
    if (std::chrono::steady_clock::now() > l.deadline) {
      l.fail("launch past its deadline of " + std::to_string(l.cfg.timeout_s) + " s (block " + std::to_string(block) +
             " still running: a cross-block wait that never ends?)");
      return;
    }
    // Only spin-waits ran: let the other blocks move, and back off (up to 1 ms) while it lasts, so
    // that waiting blocks do not take the cores from the working ones (CI has two).
    spins = all_spun ? spins + 1 : 0;
    if (spins > 0 && spins <= 8) std::this_thread::yield();
    if (spins > 8) std::this_thread::sleep_for(std::chrono::microseconds(std::min(1000, 10 << std::min(spins - 8, 7))));
  }
}

void worker(Launch& l) {
  // One stack per thread of a block, a guard page below each; reused by the blocks this worker runs.
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t each = kStackBytes + page, n = l.cfg.block_threads;
  char* mem = static_cast<char*>(mmap(nullptr, each * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (mem == MAP_FAILED) {
    l.fail("mmap of the fiber stacks failed");
    return;
  }
  std::vector<char*> stacks(n);
  for (std::size_t t = 0; t < n; ++t) {
    mprotect(mem + t * each, page, PROT_NONE);
    stacks[t] = mem + t * each + page;
  }
  Block b;
  b.launch = &l;
  b.warp_size = CUDA_EMU_WARP_SIZE;
  tls_block = &b;
  while (!l.abort.load()) {
    const unsigned int block = l.next_block.fetch_add(1);
    if (block >= l.cfg.grid) break;
    run_block(b, block, stacks);
  }
  tls_block = nullptr;
  tls_ctx = nullptr;
  munmap(mem, each * n);
}

}  // namespace

void syncthreads(const char* file, int line) {
  Block& b = *tls_block;
  Fiber& f = *b.cur;
  // Strict, whichever order the fibers run in: a barrier in a block some of whose threads have
  // exited is a barrier in divergent code (undefined in CUDA), as is an exit while others wait.
  if (b.live != static_cast<int>(b.fibers.size())) {
    fail_here(where(f) + ": __syncthreads at " + site(file, line) + " after threads of its block exited " +
              "(__syncthreads reached by part of the block)");
  }
  if (b.sync_arrived == 0) {
    b.sync_file = file;
    b.sync_line = line;
  } else if (b.sync_line != line || std::strcmp(b.sync_file, file) != 0) {
    fail_here("__syncthreads mismatch in block " + std::to_string(f.idx.block_idx.x) + ": thread " +
              std::to_string(f.idx.thread_idx.x) + " at " + site(file, line) + ", others at " +
              site(b.sync_file, b.sync_line));
  }
  f.file = file;
  f.line = line;
  if (++b.sync_arrived == b.live) {
    b.sync_arrived = 0;
    for (Fiber& o : b.fibers) {
      if (o.state == Fiber::kSync) o.state = Fiber::kReady;
    }
    return;
  }
  f.state = Fiber::kSync;
  yield_to_scheduler();
}

void shfl_down(void* value, std::size_t size, unsigned int delta, int width, unsigned int mask, const char* file,
               int line) {
  Block& b = *tls_block;
  Fiber& f = *b.cur;
  Warp& w = b.warps[static_cast<std::size_t>(f.warp)];
  if (mask != 0xffffffffu || width <= 0 || width > b.warp_size || (width & (width - 1)) != 0) {
    fail_here("WARP_SHFL_DOWN at " + site(file, line) + ": only full masks and power-of-two widths are emulated");
  }
  if (w.exited > 0) fail_here(where(f) + ": WARP_SHFL_DOWN at " + site(file, line) + " after a lane of its warp exited");
  if (w.arrived == 0) {
    w.file = file;
    w.line = line;
    w.delta = delta;
    w.width = width;
  } else if (w.line != line || std::strcmp(w.file, file) != 0 || w.delta != delta || w.width != width) {
    fail_here("WARP_SHFL_DOWN mismatch in warp " + std::to_string(f.warp) + " of block " +
              std::to_string(f.idx.block_idx.x) + ": lane " + std::to_string(f.lane) + " at " + site(file, line) +
              " delta " + std::to_string(delta) + ", others at " + site(w.file, w.line) + " delta " +
              std::to_string(w.delta));
  }
  // Two buffers by generation: a lane cannot write generation g + 2 before every lane has arrived
  // at g + 1, that is, before every lane has read generation g.
  const int slot = static_cast<int>(w.gen & 1);
  std::memcpy(w.buf[slot][f.lane], value, size);
  f.file = file;
  f.line = line;
  if (++w.arrived == b.warp_size) {
    w.arrived = 0;
    ++w.gen;
    for (int l = 0; l < b.warp_size; ++l) {
      Fiber& o = b.fibers[static_cast<std::size_t>(f.warp * b.warp_size + l)];
      if (o.state == Fiber::kShfl) o.state = Fiber::kReady;
    }
  } else {
    f.state = Fiber::kShfl;
    yield_to_scheduler();
  }
  const unsigned int in_group = static_cast<unsigned int>(f.lane % width);
  if (in_group + delta < static_cast<unsigned int>(width)) std::memcpy(value, w.buf[slot][f.lane + delta], size);
}

void atomic_point() {
  Block* b = tls_block;
  if (b == nullptr || b->cur == nullptr) return;  // host code (no launch running)
  b->cur->spun = true;
  // Seeded: now and then give the OS thread away too, so that blocks interleave differently.
  if (b->next() % 8 == 1) std::this_thread::yield();
  yield_to_scheduler();
}

std::string launch(const LaunchConfig& cfg, const std::function<void()>& body) {
  if (cfg.grid == 0 || cfg.block_threads == 0 || cfg.block_threads % CUDA_EMU_WARP_SIZE != 0 ||
      cfg.block_threads > 1024) {
    return "launch: expected grid >= 1 and 32..1024 threads per block in whole warps";
  }
  Launch l;
  l.body = &body;
  l.cfg = cfg;
  l.deadline = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                       std::chrono::duration<double>(cfg.timeout_s));
  const unsigned int workers = std::max(1u, std::min(cfg.grid, cfg.workers));
  std::mutex done_mu;
  std::condition_variable done_cv;
  unsigned int done = 0;
  std::vector<std::thread> threads;
  for (unsigned int i = 0; i < workers; ++i) {
    threads.emplace_back([&] {
      worker(l);
      std::lock_guard<std::mutex> lock(done_mu);
      ++done;
      done_cv.notify_all();
    });
  }
  {
    // A fiber that loops without reaching a barrier or an atomic cannot be stopped: past twice
    // the deadline, end the process rather than hang the test run.
    std::unique_lock<std::mutex> lock(done_mu);
    const auto hard = std::chrono::duration<double>(2 * cfg.timeout_s + 5);
    if (!done_cv.wait_for(lock, hard, [&] { return done == workers; })) {
      std::fprintf(stderr, "cuda_emu: a launch ran past twice its deadline without yielding; aborting\n");
      std::abort();
    }
  }
  for (std::thread& t : threads) t.join();
  return l.error;
}

}  // namespace cuda_emu

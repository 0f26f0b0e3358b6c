// Micro-benchmarks of the coroutine runtime and the reactor.
//
//   bazel run -c opt //bench:micro_bench
//
// GCC 12 miscompiles a co_await inside an if or while condition (the frame
// is laid out wrongly), so results are always bound to a variable first.
//
// Every benchmark reports items_per_second, where an item is one task, one
// lock acquisition or one I/O round trip. The timed loops run inside a
// coroutine driven by sync_wait, so each figure includes the cost of the
// event loop that would drive real requests.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/co_mutex.h"
#include "engine/sync_wait.h"
#include "engine/task.h"
#include "engine/task_group.h"
#include "uring/aligned_buffer.h"
#include "uring/ops.h"
#include "uring/reactor.h"

namespace uqcow {
namespace {

// ---- coroutine runtime -------------------------------------------------------

Task<int> value_task(int v) { co_return v; }

// One item: create a Task<int> (frame from the pool), start it by co_await,
// take its value, destroy it.
Task<void> create_and_resume_loop(benchmark::State& state) {
  long sum = 0;
  for (auto _ : state) sum += co_await value_task(1);
  benchmark::DoNotOptimize(sum);
}

void BM_TaskCreateResume(benchmark::State& state) {
  sync_wait(create_and_resume_loop(state));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TaskCreateResume);

// One item: lock and unlock a free CoMutex (never suspends).
Task<void> uncontended_loop(benchmark::State& state) {
  CoMutex m;
  for (auto _ : state) {
    co_await m.lock();
    benchmark::DoNotOptimize(m);
    m.unlock();
  }
}

void BM_CoMutexUncontended(benchmark::State& state) {
  sync_wait(uncontended_loop(state));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CoMutexUncontended);

Task<void> contender(CoMutex& m, int rounds, long& acquisitions) {
  for (int i = 0; i < rounds; ++i) {
    co_await m.lock();
    ++acquisitions;
    m.unlock();  // hands the lock to the next waiter; we queue up behind
  }
}

// `n` coroutines pass the lock around: the driver holds it while they all
// queue, so from then on every unlock() is a FIFO hand-off and every
// acquisition a suspension plus a resume from the ready queue.
Task<void> contended_round(int n, int rounds, long& acquisitions) {
  CoMutex m;
  TaskGroup g;
  co_await m.lock();
  for (int i = 0; i < n; ++i) g.spawn(contender(m, rounds, acquisitions));
  m.unlock();
  co_await g.join();
}

constexpr int kRoundsPerContender = 256;

// One item: one lock acquisition (a hand-off). No reactor: sync_wait only
// drains the ready queue.
void BM_CoMutexContended(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  long acquisitions = 0;
  for (auto _ : state) sync_wait(contended_round(n, kRoundsPerContender, acquisitions));
  if (acquisitions != state.iterations() * n * kRoundsPerContender) {
    state.SkipWithError("lost lock acquisitions");
  }
  state.SetItemsProcessed(acquisitions);
}
BENCHMARK(BM_CoMutexContended)->ArgName("coroutines")->Arg(2)->Arg(16)->Arg(256);

// ---- reactor -------------------------------------------------------------------

std::unique_ptr<uring::Reactor> make_reactor(benchmark::State& state) {
  auto r = uring::Reactor::create();
  if (!r.ok()) {
    state.SkipWithError(("Reactor::create: " + r.error().message()).c_str());
    return nullptr;
  }
  return std::move(r).value();
}

// io_uring_enter calls per item: 1 means no batching.
void report_enters(benchmark::State& state, const uring::Reactor& reactor, int64_t items) {
  if (items > 0) {
    state.counters["enters_per_op"] =
        static_cast<double>(reactor.stats().enters) / static_cast<double>(items);
  }
}

Task<void> one_nop(int* failures) {
  int r = co_await uring::nop();
  if (r != 0) ++*failures;
}

// One iteration: `batch` NOPs prepared in one loop turn, submitted with one
// io_uring_enter, all awaited.
Task<void> nop_loop(benchmark::State& state, int batch, int* failures) {
  for (auto _ : state) {
    if (batch == 1) {
      int r = co_await uring::nop();
      if (r != 0) ++*failures;
    } else {
      TaskGroup g;
      for (int i = 0; i < batch; ++i) g.spawn(one_nop(failures));
      co_await g.join();
    }
  }
}

// One item: one NOP through the ring and back.
void BM_ReactorNop(benchmark::State& state) {
  auto reactor = make_reactor(state);
  if (!reactor) return;
  const int batch = static_cast<int>(state.range(0));
  int failures = 0;
  sync_wait(*reactor, nop_loop(state, batch, &failures));
  if (failures) state.SkipWithError("a NOP failed");
  state.SetItemsProcessed(state.iterations() * batch);
  report_enters(state, *reactor, state.items_processed());
}
// Wall-clock rates: completions may be produced by kernel workers whose CPU
// time is not this thread's.
BENCHMARK(BM_ReactorNop)->ArgName("batch")->Arg(1)->Arg(32)->UseRealTime();

// A file in /dev/shm (tmpfs) so that no disk is involved. Note that when the
// kernel cannot read tmpfs without blocking it hands each read to an io-wq
// worker; enters_per_op above 1/qd shows completions arriving one by one.
class ShmFile {
 public:
  static constexpr size_t kSize = 16 << 20;
  ShmFile() : path_("/dev/shm/uqcow_micro_bench." + std::to_string(::getpid())) {
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd_ < 0) return;
    std::vector<char> chunk(1 << 20, 'x');
    for (size_t off = 0; off < kSize; off += chunk.size()) {
      if (::pwrite(fd_, chunk.data(), chunk.size(), static_cast<off_t>(off)) !=
          static_cast<ssize_t>(chunk.size())) {
        ::close(fd_);
        fd_ = -1;
        return;
      }
    }
  }
  ~ShmFile() {
    if (fd_ >= 0) ::close(fd_);
    ::unlink(path_.c_str());
  }
  int fd() const { return fd_; }

 private:
  std::string path_;
  int fd_ = -1;
};

// 4 KiB-aligned offsets spread over the file (a full-period LCG).
struct OffsetGenerator {
  uint64_t state = 1;
  uint64_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (state >> 20) % (ShmFile::kSize / 4096) * 4096;
  }
};

Task<void> read_one(int fd, std::byte* buf, uint64_t offset, int* failures) {
  int r = co_await uring::read(fd, buf, 4096, offset);
  if (r != 0) ++*failures;
}

// One iteration: `depth` 4 KiB reads in flight together, all awaited.
Task<void> read_loop(benchmark::State& state, int fd, int depth, int* failures) {
  AlignedBuffer bufs(static_cast<size_t>(depth) * 4096);
  OffsetGenerator offsets;
  for (auto _ : state) {
    if (depth == 1) {
      int r = co_await uring::read(fd, bufs.data(), 4096, offsets.next());
      if (r != 0) ++*failures;
    } else {
      TaskGroup g;
      for (int i = 0; i < depth; ++i) {
        g.spawn(read_one(fd, bufs.data() + i * 4096, offsets.next(), failures));
      }
      co_await g.join();
    }
  }
}

// One item: one 4 KiB read through the ring and back.
void BM_Read4k(benchmark::State& state) {
  ShmFile file;
  if (file.fd() < 0) {
    state.SkipWithError("cannot create a 16 MiB file in /dev/shm");
    return;
  }
  auto reactor = make_reactor(state);
  if (!reactor) return;
  const int depth = static_cast<int>(state.range(0));
  int failures = 0;
  sync_wait(*reactor, read_loop(state, file.fd(), depth, &failures));
  if (failures) state.SkipWithError("a read failed");
  state.SetItemsProcessed(state.iterations() * depth);
  state.SetBytesProcessed(state.iterations() * depth * 4096);
  report_enters(state, *reactor, state.items_processed());
}
BENCHMARK(BM_Read4k)->ArgName("qd")->Arg(1)->Arg(32)->UseRealTime();

}  // namespace
}  // namespace uqcow

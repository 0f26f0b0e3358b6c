#include "bench/workload.h"

#include <sys/resource.h>

#include <chrono>
#include <cstring>

#include "block/endian.h"
#include "engine/task_group.h"
#include "uring/aligned_buffer.h"
#include "uring/ops.h"

namespace uqcow::bench {
namespace {

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

double thread_cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_THREAD, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// xorshift64*: cheap, good enough for offsets, reproducible per seed.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull) {
    if (!s) s = 1;
  }
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545f4914f6cdd1dull;
  }
};

constexpr uint64_t kStampMagic = 0x7571636f77766572ull;  // "uqcowver"

// --verify stamp: every 512-byte sector starts with (magic ^ offset, gen);
// the rest is a pattern derived from both.
void stamp(std::byte* p, uint64_t bs, uint64_t offset, uint64_t gen) {
  for (uint64_t s = 0; s < bs; s += 512) {
    uint64_t off = offset + s;
    store_be64(p + s, kStampMagic ^ off);
    store_be64(p + s + 8, gen);
    for (uint64_t i = 16; i < 512 && s + i < bs; ++i) p[s + i] = std::byte((gen * 131 + off / 512 + i) & 0xff);
  }
}

bool check_stamp(const std::byte* p, uint64_t bs, uint64_t offset, uint64_t gen, std::string& why) {
  std::vector<std::byte> want(bs);
  stamp(want.data(), bs, offset, gen);
  if (std::memcmp(p, want.data(), bs) == 0) return true;
  uint64_t found_gen = load_be64(p + 8);
  why = "block at offset " + std::to_string(offset) + ": expected generation " + std::to_string(gen) +
        ", found " + (load_be64(p) == (kStampMagic ^ offset) ? "generation " + std::to_string(found_gen)
                                                                     : std::string("no stamp"));
  return false;
}

struct Job {
  Disk& disk;
  const Workload& w;
  uint64_t range_start = 0;
  uint64_t nblocks = 0;
  uint64_t step = 0;
  uint64_t seq_cursor = 0;
  uint64_t issued = 0;
  bool stop = false;
  bool measuring = false;
  uint64_t start_ns = 0;
  uint64_t deadline_ns = 0;
  double cpu_start = 0;
  uint64_t writes_since_flush = 0;
  std::vector<uint32_t> generation;  // --verify: last generation per block
  std::vector<uint8_t> busy;         // --verify: a write to the block in flight
  Status error;
  JobResult result;

  Job(Disk& d, const Workload& wl) : disk(d), w(wl) {}

  void begin_measuring(uint64_t now) {
    measuring = true;
    result = JobResult{};
    start_ns = now;
    cpu_start = thread_cpu_seconds();
    deadline_ns = w.runtime_s > 0 ? now + static_cast<uint64_t>(w.runtime_s * 1e9) : 0;
  }
};

bool is_read(Pattern p, Rng& rng, unsigned mix) {
  switch (p) {
    case Pattern::kRandRead:
    case Pattern::kRead: return true;
    case Pattern::kRandRW: return rng.next() % 100 < mix;
    default: return false;
  }
}

uint64_t pick_block(Job& j, Rng& rng) {
  if (j.w.pattern == Pattern::kRead || j.w.pattern == Pattern::kWrite) {
    // qemu-img bench -S: start at the offset, advance by the step, wrap at
    // the end of the range.
    uint64_t off = j.seq_cursor;
    j.seq_cursor += j.step;
    if (j.seq_cursor + j.w.block_size > j.nblocks * j.w.block_size) j.seq_cursor = 0;
    return off;  // a byte offset within the range for sequential patterns
  }
  return (rng.next() % j.nblocks) * j.w.block_size;
}

Task<void> worker(Job& j, unsigned id) {
  const uint64_t bs = j.w.block_size;
  AlignedBuffer buf(bs);
  std::memset(buf.data(), 0xa5, bs);
  Rng rng(j.w.seed + id);
  while (!j.stop) {
    if (j.w.count && j.measuring && j.issued >= j.w.count) break;
    bool read = is_read(j.w.pattern, rng, j.w.rwmix_read);
    uint64_t rel = pick_block(j, rng);
    uint64_t block = rel / bs;
    if (j.w.verify && !read) {
      for (int tries = 0; j.busy[block] && tries < 64; ++tries) block = (rng.next() % j.nblocks), rel = block * bs;
      if (j.busy[block]) read = true;  // everything busy: do a read instead
    }
    const uint64_t offset = j.range_start + rel;
    uint32_t gen = 0;
    if (!read && j.w.verify) {
      gen = ++j.generation[block];
      j.busy[block] = 1;
      stamp(buf.data(), bs, offset, gen);
    }
    if (j.measuring) ++j.issued;
    uint64_t t0 = now_ns();
    // (Not a ?: expression: GCC 12 mishandles temporaries of co_await in
    // conditional operands.)
    Status s;
    if (read) {
      s = co_await j.disk.read(offset, buf.span());
    } else {
      s = co_await j.disk.write(offset, std::span<const std::byte>(buf.data(), bs));
    }
    uint64_t t1 = now_ns();
    if (!read && j.w.verify) j.busy[block] = 0;
    if (!s.ok()) {
      if (j.error.ok()) j.error = s;
      j.stop = true;
      break;
    }
    if (!j.measuring) {
      if (t1 >= j.start_ns) j.begin_measuring(t1);  // warm-up over
      continue;
    }
    JobResult& r = j.result;
    r.latency.record(t1 - t0);
    ++r.ios;
    r.bytes += bs;
    if (read) ++r.reads; else ++r.writes;
    if (!read && j.w.flush_interval && ++j.writes_since_flush >= j.w.flush_interval) {
      j.writes_since_flush = 0;
      Status f = co_await j.disk.flush();
      if (!f.ok() && j.error.ok()) j.error = f;
    }
    if (j.deadline_ns && t1 >= j.deadline_ns) j.stop = true;
  }
}

Task<void> progress_ticker(Job& j, ProgressFn& progress, uring::TimeoutOp** sleeping, bool& done) {
  while (!done) {
    uring::TimeoutOp tick(1000000000ull);
    *sleeping = &tick;
    int r = co_await tick;
    *sleeping = nullptr;
    if (done || r == -ECANCELED) break;
    if (j.measuring) progress(j.result.ios, static_cast<double>(now_ns() - j.start_ns) / 1e9);
  }
}

Task<Status> verify_pass(Job& j) {
  const uint64_t bs = j.w.block_size;
  AlignedBuffer buf(bs);
  for (uint64_t b = 0; b < j.nblocks; ++b) {
    if (j.generation[b] == 0) continue;
    uint64_t offset = j.range_start + b * bs;
    UQ_CO_TRY(co_await j.disk.read(offset, buf.span()));
    ++j.result.verified_blocks;
    std::string why;
    if (!check_stamp(buf.data(), bs, offset, j.generation[b], why)) {
      if (j.result.verify_errors++ == 0) j.result.first_verify_error = why;
    }
  }
  co_return Status();
}

}  // namespace

Result<Pattern> parse_pattern(const std::string& name) {
  if (name == "randread") return Pattern::kRandRead;
  if (name == "randwrite") return Pattern::kRandWrite;
  if (name == "randrw") return Pattern::kRandRW;
  if (name == "read") return Pattern::kRead;
  if (name == "write") return Pattern::kWrite;
  return Error(EINVAL, "--rw: '" + name + "' is not randread, randwrite, randrw, read or write");
}

const char* pattern_name(Pattern p) {
  switch (p) {
    case Pattern::kRandRead: return "randread";
    case Pattern::kRandWrite: return "randwrite";
    case Pattern::kRandRW: return "randrw";
    case Pattern::kRead: return "read";
    case Pattern::kWrite: return "write";
  }
  return "?";
}

Task<Result<JobResult>> run_job(Disk& disk, const Workload& w, ProgressFn progress) {
  if (w.block_size == 0 || w.block_size % 512) co_return Error(EINVAL, "--bs: must be a multiple of 512");
  if (w.depth == 0) co_return Error(EINVAL, "--depth: must be at least 1");
  if (w.runtime_s <= 0 && w.count == 0) co_return Error(EINVAL, "give --runtime or --count");
  if (w.offset >= disk.size()) co_return Error(EINVAL, "--offset: beyond the end of the disk");
  Job j(disk, w);
  uint64_t size = w.size ? std::min(w.size, disk.size() - w.offset) : disk.size() - w.offset;
  j.range_start = w.offset;
  j.nblocks = size / w.block_size;
  if (j.nblocks == 0) co_return Error(EINVAL, "--size: the range holds no whole block of --bs");
  j.step = w.step ? w.step : w.block_size;
  if (w.verify) {
    j.generation.assign(j.nblocks, 0);
    j.busy.assign(j.nblocks, 0);
  }
  uint64_t now = now_ns();
  if (w.warmup_s > 0) {
    j.start_ns = now + static_cast<uint64_t>(w.warmup_s * 1e9);  // measuring starts then
  } else {
    j.begin_measuring(now);
  }
  TaskGroup group;
  bool done = false;
  uring::TimeoutOp* sleeping = nullptr;
  if (progress) group.spawn(progress_ticker(j, progress, &sleeping, done));
  {
    std::vector<Task<void>> workers;
    for (unsigned i = 0; i < w.depth; ++i) workers.push_back(worker(j, i));
    TaskGroup pool;
    for (auto& t : workers) pool.spawn(std::move(t));
    co_await pool.join();
  }
  uint64_t end = now_ns();
  j.result.seconds = static_cast<double>(end - j.start_ns) / 1e9;
  j.result.cpu_seconds = thread_cpu_seconds() - j.cpu_start;
  done = true;
  if (sleeping) (void)co_await uring::TimeoutRemoveOp(sleeping);
  co_await group.join();
  if (!j.error.ok()) co_return j.error.error();
  if (w.verify) UQ_CO_TRY(co_await verify_pass(j));
  co_return std::move(j.result);
}

}  // namespace uqcow::bench

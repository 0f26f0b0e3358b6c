// Tests of the reactor and the awaitable operations, against real files in
// $TEST_TMPDIR. What the file holds is always checked with plain pread(2), an
// oracle independent of io_uring.
#include "uring/reactor.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/result.h"
#include "engine/sync_wait.h"
#include "engine/task.h"
#include "engine/task_group.h"
#include "engine/when_all.h"
#include "uring/ops.h"

namespace uqcow::uring {
namespace {

// ---- helpers (plain syscalls: the oracle) ---------------------------------

std::string temp_path(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  std::string path = std::string(dir && *dir ? dir : "/tmp") + "/" + name;
  ::unlink(path.c_str());
  return path;
}

// The byte a pattern with `seed` holds at file position `pos`: a block that
// lands at the wrong offset, or a stale one, does not match.
std::byte pattern_byte(uint64_t pos, uint32_t seed) {
  uint64_t x = (pos + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t{seed} << 32 | seed);
  x ^= x >> 29;
  return static_cast<std::byte>(x & 0xff);
}

std::vector<std::byte> pattern(uint64_t pos, size_t len, uint32_t seed) {
  std::vector<std::byte> v(len);
  for (size_t i = 0; i < len; ++i) v[i] = pattern_byte(pos + i, seed);
  return v;
}

// Compares byte vectors; on a mismatch reports the sizes and the first
// differing byte instead of dumping both vectors.
::testing::AssertionResult SameBytes(const std::vector<std::byte>& got,
                                     const std::vector<std::byte>& want) {
  if (got == want) return ::testing::AssertionSuccess();
  size_t n = std::min(got.size(), want.size());
  size_t i = 0;
  while (i < n && got[i] == want[i]) ++i;
  auto failure = ::testing::AssertionFailure()
                 << "got " << got.size() << " bytes, want " << want.size();
  if (i < n) {
    failure << "; first difference at byte " << i << ": got " << std::to_integer<int>(got[i])
            << ", want " << std::to_integer<int>(want[i]);
  }
  return failure;
}

// [offset, offset + len) by pread(2); bytes past EOF are absent.
std::vector<std::byte> pread_all(const std::string& path, uint64_t offset, size_t len) {
  std::vector<std::byte> out(len);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, out.data() + done, len - done, static_cast<off_t>(offset + done));
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(done);
  return out;
}

bool pwrite_all(const std::string& path, uint64_t offset, const std::vector<std::byte>& data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  ssize_t n = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
  ::close(fd);
  return n == static_cast<ssize_t>(data.size());
}

int64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

std::unique_ptr<Reactor> make_reactor(unsigned entries = 256) {
  auto r = Reactor::create(ReactorOptions{.entries = entries});
  if (!r.ok()) {
    ADD_FAILURE() << "Reactor::create: " << r.error().message();
    return nullptr;
  }
  return std::move(r).value();
}

// An open file descriptor, closed on scope exit.
class Fd {
 public:
  Fd(const std::string& path, int flags) : fd_(::open(path.c_str(), flags | O_CLOEXEC, 0644)) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// ---- single operations wrapped as tasks -----------------------------------

Task<int> read_at(int fd, void* buf, size_t len, uint64_t offset,
                  EofPolicy eof = EofPolicy::kError) {
  co_return co_await uring::read(fd, buf, len, offset, eof);
}

Task<int> write_at(int fd, const void* buf, size_t len, uint64_t offset) {
  co_return co_await uring::write(fd, buf, len, offset);
}

Task<int> readv_at(int fd, std::span<iovec> iov, uint64_t offset) {
  co_return co_await uring::readv(fd, iov, offset);
}

Task<int> writev_at(int fd, std::span<iovec> iov, uint64_t offset) {
  co_return co_await uring::writev(fd, iov, offset);
}

Task<int> fsync_fd(int fd) { co_return co_await uring::fsync(fd); }

Task<int> fallocate_fd(int fd, uint64_t offset, uint64_t len) {
  co_return co_await uring::fallocate(fd, 0, offset, len);
}

Task<int> nop_task() { co_return co_await uring::nop(); }

Task<int> sleep_ns(uint64_t ns) { co_return co_await uring::sleep_for_ns(ns); }

// ---- reactor lifecycle -----------------------------------------------------

TEST(Reactor, RunOnceReturnsFalseWhenNothingIsInFlight) {
  auto reactor = make_reactor();
  ASSERT_TRUE(reactor);
  EXPECT_FALSE(reactor->run_once());
  EXPECT_EQ(sync_wait(*reactor, nop_task()), 0);
  EXPECT_EQ(reactor->in_flight(), 0u);
  EXPECT_FALSE(reactor->run_once());
}

TEST(Reactor, SecondReactorOnTheSameThreadFailsWithEbusy) {
  auto first = make_reactor();
  ASSERT_TRUE(first);
  EXPECT_TRUE(Reactor::has_current());
  EXPECT_EQ(&Reactor::current(), first.get());

  auto second = Reactor::create();
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code(), EBUSY);
  // The failed create left the thread's reactor alone.
  EXPECT_EQ(&Reactor::current(), first.get());

  // One ring per thread, not per process: another thread gets its own.
  int other_thread_nop = -1;
  bool other_thread_created = false;
  std::thread t([&] {
    auto r = Reactor::create();
    other_thread_created = r.ok();
    if (r.ok()) other_thread_nop = sync_wait(*r.value(), nop_task());
  });
  t.join();
  EXPECT_TRUE(other_thread_created);
  EXPECT_EQ(other_thread_nop, 0);

  // Destroying the reactor frees the slot.
  first.reset();
  EXPECT_FALSE(Reactor::has_current());
  auto third = Reactor::create();
  EXPECT_TRUE(third.ok());
}

// ---- thousands of requests through a tiny SQ ------------------------------

constexpr size_t kBlocks = 4096;
constexpr size_t kBlockSize = 4096;

Task<void> write_block(int fd, uint64_t offset, uint32_t seed, int* failures) {
  std::vector<std::byte> data = pattern(offset, kBlockSize, seed);
  int r = co_await uring::write(fd, data.data(), data.size(), offset);
  if (r != 0) ++*failures;
}

Task<void> check_block(int fd, uint64_t offset, uint32_t seed, int* failures) {
  std::vector<std::byte> buf(kBlockSize);
  int r = co_await uring::read(fd, buf.data(), buf.size(), offset);
  if (r != 0 || buf != pattern(offset, kBlockSize, seed)) ++*failures;
}

// Phase 1: writes every block (seed 1).
Task<void> write_all_blocks(int fd, int* failures) {
  TaskGroup g;
  for (size_t b = 0; b < kBlocks; ++b) g.spawn(write_block(fd, b * kBlockSize, 1, failures));
  co_await g.join();
}

// Phase 2, all in flight together: rewrites the odd blocks (seed 2) and reads
// back the even ones.
Task<void> rewrite_odd_check_even(int fd, int* failures) {
  TaskGroup g;
  for (size_t b = 0; b < kBlocks; ++b) {
    if (b % 2) {
      g.spawn(write_block(fd, b * kBlockSize, 2, failures));
    } else {
      g.spawn(check_block(fd, b * kBlockSize, 1, failures));
    }
  }
  co_await g.join();
}

// Phase 3: reads every block back.
Task<void> check_all_blocks(int fd, int* failures) {
  TaskGroup g;
  for (size_t b = 0; b < kBlocks; ++b) {
    g.spawn(check_block(fd, b * kBlockSize, b % 2 ? 2 : 1, failures));
  }
  co_await g.join();
}

TEST(Reactor, ThousandsOfConcurrentRequestsThroughASixteenEntrySq) {
  constexpr unsigned kEntries = 16;
  auto reactor = make_reactor(kEntries);
  ASSERT_TRUE(reactor);
  std::string path = temp_path("many_requests");
  Fd fd(path, O_RDWR | O_CREAT | O_TRUNC);
  ASSERT_GE(fd.get(), 0);

  int failures = 0;
  sync_wait(*reactor, write_all_blocks(fd.get(), &failures));
  sync_wait(*reactor, rewrite_odd_check_even(fd.get(), &failures));
  const ReactorStats before_reads = reactor->stats();
  sync_wait(*reactor, check_all_blocks(fd.get(), &failures));
  EXPECT_EQ(failures, 0);

  // The oracle: every block as the last phase that wrote it left it.
  std::vector<std::byte> file = pread_all(path, 0, kBlocks * kBlockSize);
  ASSERT_EQ(file.size(), kBlocks * kBlockSize);
  size_t bad_blocks = 0;
  for (size_t b = 0; b < kBlocks; ++b) {
    std::vector<std::byte> block(file.begin() + b * kBlockSize,
                                 file.begin() + (b + 1) * kBlockSize);
    if (block != pattern(b * kBlockSize, kBlockSize, b % 2 ? 2 : 1)) ++bad_blocks;
  }
  EXPECT_EQ(bad_blocks, 0u);

  const ReactorStats& s = reactor->stats();
  const uint64_t requests = 3 * kBlocks;
  const uint64_t read_enters = s.enters - before_reads.enters;
  RecordProperty("sq_full", std::to_string(s.sq_full));
  RecordProperty("enters", std::to_string(s.enters));
  RecordProperty("read_phase_enters", std::to_string(read_enters));
  // Far more requests than SQ entries were in flight: all but the first SQ's
  // worth of each phase waited on the pending list.
  EXPECT_GE(s.sq_full, requests - 3 * kEntries);
  // Every SQE handed to the kernel was reaped (a short transfer is re-armed,
  // so both counts may exceed the number of requests).
  EXPECT_GE(s.submitted, requests);
  EXPECT_EQ(s.completions, s.submitted);
  // Batching: each loop turn fills the SQ from the pending list and submits
  // it with one io_uring_enter. The read phase shows it cleanly (ideally
  // 4096 / 16 = 256 enters): page-cache reads complete during the submit.
  // Writes may be handed to kernel workers and complete one by one, each
  // costing a wait, so the whole run is held to a looser bound.
  EXPECT_LT(read_enters * 4, kBlocks) << "read phase: enters=" << read_enters;
  EXPECT_LT(s.enters, requests) << "enters=" << s.enters << " requests=" << requests;
  EXPECT_EQ(reactor->in_flight(), 0u);
  EXPECT_FALSE(reactor->run_once());
}

// ---- end of file ------------------------------------------------------------

class ShortRead : public ::testing::Test {
 protected:
  void SetUp() override {
    reactor_ = make_reactor();
    ASSERT_TRUE(reactor_);
    path_ = temp_path("short_read");
    ASSERT_TRUE(pwrite_all(path_, 0, pattern(0, kFileSize, 7)));
  }
  static constexpr size_t kFileSize = 1000;
  std::unique_ptr<Reactor> reactor_;
  std::string path_;
};

TEST_F(ShortRead, ZeroFillGivesDataThenZeros) {
  Fd fd(path_, O_RDONLY);
  ASSERT_GE(fd.get(), 0);
  // Starts inside the file, ends 3000 bytes past EOF.
  std::vector<std::byte> buf(4000, std::byte{0xAA});
  EXPECT_EQ(
      sync_wait(*reactor_, read_at(fd.get(), buf.data(), buf.size(), 0, EofPolicy::kZeroFill)), 0);
  std::vector<std::byte> want = pattern(0, kFileSize, 7);
  want.resize(buf.size(), std::byte{0});
  EXPECT_TRUE(SameBytes(buf, want));
}

TEST_F(ShortRead, ZeroFillEntirelyPastEof) {
  Fd fd(path_, O_RDONLY);
  ASSERT_GE(fd.get(), 0);
  std::vector<std::byte> buf(512, std::byte{0xAA});
  EXPECT_EQ(sync_wait(*reactor_,
                      read_at(fd.get(), buf.data(), buf.size(), 1 << 20, EofPolicy::kZeroFill)),
            0);
  EXPECT_TRUE(SameBytes(buf, std::vector<std::byte>(512, std::byte{0})));
}

TEST_F(ShortRead, ErrorPolicyReturnsEnodata) {
  Fd fd(path_, O_RDONLY);
  ASSERT_GE(fd.get(), 0);
  std::vector<std::byte> buf(2000);
  EXPECT_EQ(sync_wait(*reactor_, read_at(fd.get(), buf.data(), buf.size(), 500, EofPolicy::kError)),
            -ENODATA);
  EXPECT_EQ(sync_wait(*reactor_, read_at(fd.get(), buf.data(), 10, kFileSize)), -ENODATA);
  // A read that ends exactly at EOF is not short.
  EXPECT_EQ(sync_wait(*reactor_, read_at(fd.get(), buf.data(), 100, kFileSize - 100)), 0);
  EXPECT_TRUE(SameBytes(std::vector<std::byte>(buf.begin(), buf.begin() + 100),
                        pattern(kFileSize - 100, 100, 7)));
}

// ---- error propagation -------------------------------------------------------

class Errors : public ::testing::Test {
 protected:
  void SetUp() override {
    reactor_ = make_reactor();
    ASSERT_TRUE(reactor_);
    path_ = temp_path("errors");
    ASSERT_TRUE(pwrite_all(path_, 0, pattern(0, 4096, 1)));
  }
  std::unique_ptr<Reactor> reactor_;
  std::string path_;
  std::vector<std::byte> buf_ = std::vector<std::byte>(4096);
};

TEST_F(Errors, ReadFromWriteOnlyFdFailsWithEbadf) {
  Fd fd(path_, O_WRONLY);
  ASSERT_GE(fd.get(), 0);
  EXPECT_EQ(sync_wait(*reactor_, read_at(fd.get(), buf_.data(), buf_.size(), 0)), -EBADF);
  iovec iov{buf_.data(), buf_.size()};
  EXPECT_EQ(sync_wait(*reactor_, readv_at(fd.get(), {&iov, 1}, 0)), -EBADF);
}

TEST_F(Errors, WriteToReadOnlyFdFailsWithEbadf) {
  Fd fd(path_, O_RDONLY);
  ASSERT_GE(fd.get(), 0);
  EXPECT_EQ(sync_wait(*reactor_, write_at(fd.get(), buf_.data(), buf_.size(), 0)), -EBADF);
  iovec iov{buf_.data(), buf_.size()};
  EXPECT_EQ(sync_wait(*reactor_, writev_at(fd.get(), {&iov, 1}, 0)), -EBADF);
  EXPECT_EQ(sync_wait(*reactor_, fallocate_fd(fd.get(), 0, 8192)), -EBADF);
  // Nothing was written.
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 4096), pattern(0, 4096, 1)));
}

TEST_F(Errors, InvalidFdFailsWithEbadf) {
  EXPECT_EQ(sync_wait(*reactor_, read_at(-1, buf_.data(), buf_.size(), 0)), -EBADF);
  EXPECT_EQ(sync_wait(*reactor_, write_at(-1, buf_.data(), buf_.size(), 0)), -EBADF);
  EXPECT_EQ(sync_wait(*reactor_, fsync_fd(-1)), -EBADF);
}

TEST_F(Errors, ClosedFdFailsWithEbadf) {
  int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::close(fd), 0);
  EXPECT_EQ(sync_wait(*reactor_, read_at(fd, buf_.data(), buf_.size(), 0)), -EBADF);
  EXPECT_EQ(sync_wait(*reactor_, write_at(fd, buf_.data(), buf_.size(), 0)), -EBADF);
}

// Errors arrive while many other requests are in flight, and each reaches its
// own awaiter: good and bad requests do not get each other's results.
Task<void> mixed_good_and_bad(int good_fd, int* good_ok, int* bad_ebadf) {
  TaskGroup g;
  auto one = [](int fd, bool good, int* counter) -> Task<void> {
    std::vector<std::byte> buf(512);
    int r = co_await uring::read(fd, buf.data(), buf.size(), 0);
    if (good ? r == 0 : r == -EBADF) ++*counter;
  };
  for (int i = 0; i < 200; ++i) {
    bool good = i % 3 != 0;
    g.spawn(one(good ? good_fd : -1, good, good ? good_ok : bad_ebadf));
  }
  co_await g.join();
}

TEST_F(Errors, ErrorsReachTheirOwnAwaiterAmongGoodRequests) {
  Fd fd(path_, O_RDONLY);
  ASSERT_GE(fd.get(), 0);
  int good_ok = 0;
  int bad_ebadf = 0;
  sync_wait(*reactor_, mixed_good_and_bad(fd.get(), &good_ok, &bad_ebadf));
  EXPECT_EQ(good_ok, 133);
  EXPECT_EQ(bad_ebadf, 67);
}

// ---- vectored I/O --------------------------------------------------------------

// iovecs over consecutive pieces of `buf` with the given sizes.
std::vector<iovec> split(std::vector<std::byte>& buf, const std::vector<size_t>& sizes) {
  std::vector<iovec> iov;
  size_t pos = 0;
  for (size_t n : sizes) {
    iov.push_back(iovec{buf.data() + pos, n});
    pos += n;
  }
  return iov;
}

TEST(VectorOps, WritevThenReadvWithDifferentSplits) {
  auto reactor = make_reactor();
  ASSERT_TRUE(reactor);
  std::string path = temp_path("vectored");
  Fd fd(path, O_RDWR | O_CREAT | O_TRUNC);
  ASSERT_GE(fd.get(), 0);

  constexpr uint64_t kOffset = 3;
  std::vector<size_t> write_sizes = {1, 4095, 4096, 7, 0, 10000};
  size_t total = 0;
  for (size_t n : write_sizes) total += n;
  std::vector<std::byte> data = pattern(kOffset, total, 11);
  std::vector<iovec> wiov = split(data, write_sizes);
  EXPECT_EQ(sync_wait(*reactor, writev_at(fd.get(), wiov, kOffset)), 0);
  EXPECT_EQ(file_size(path), static_cast<int64_t>(kOffset + total));
  EXPECT_TRUE(SameBytes(pread_all(path, kOffset, total), pattern(kOffset, total, 11)));

  // Read the same range back split differently.
  std::vector<std::byte> back(total, std::byte{0xAA});
  std::vector<size_t> read_sizes = {5000, 1, 3, total - 5004};
  std::vector<iovec> riov = split(back, read_sizes);
  EXPECT_EQ(sync_wait(*reactor, readv_at(fd.get(), riov, kOffset)), 0);
  for (size_t i = 0; i < total; ++i) {
    ASSERT_EQ(back[i], pattern_byte(kOffset + i, 11)) << "byte " << i;
  }
}

// EOF falls in the middle of the third iovec: the kernel returns a short
// count, the op advances its iovecs part-way into that entry, re-submits, gets
// EOF and zero-fills the rest.
TEST(VectorOps, ReadvAcrossEofContinuesMidIovecThenZeroFills) {
  auto reactor = make_reactor();
  ASSERT_TRUE(reactor);
  std::string path = temp_path("readv_eof");
  constexpr size_t kFileSize = 6000;
  ASSERT_TRUE(pwrite_all(path, 0, pattern(0, kFileSize, 5)));
  Fd fd(path, O_RDONLY);
  ASSERT_GE(fd.get(), 0);

  constexpr uint64_t kOffset = 1000;
  std::vector<size_t> sizes = {10, 3000, 2000, 5000};  // third spans [4010, 6010)
  std::vector<std::byte> buf(10010, std::byte{0xAA});
  std::vector<iovec> iov = split(buf, sizes);
  EXPECT_EQ(sync_wait(*reactor, readv_at(fd.get(), iov, kOffset)), 0);
  for (size_t i = 0; i < buf.size(); ++i) {
    uint64_t pos = kOffset + i;
    std::byte want = pos < kFileSize ? pattern_byte(pos, 5) : std::byte{0};
    ASSERT_EQ(buf[i], want) << "file position " << pos;
  }
}

// Lowers RLIMIT_FSIZE for the scope so that a write crossing the limit is cut
// short by the kernel (then the next attempt fails with EFBIG). SIGXFSZ is
// ignored meanwhile, so the process is not killed.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t limit) {
    ok_ = ::getrlimit(RLIMIT_FSIZE, &saved_) == 0;
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit lowered = saved_;
    lowered.rlim_cur = limit;
    ok_ = ok_ && ::setrlimit(RLIMIT_FSIZE, &lowered) == 0;
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &saved_);
    std::signal(SIGXFSZ, old_handler_);
  }
  bool ok() const { return ok_; }

 private:
  rlimit saved_{};
  void (*old_handler_)(int) = nullptr;
  bool ok_ = false;
};

TEST(PartialWrites, WriteCutShortReportsTheErrorAndKeepsThePrefix) {
  auto reactor = make_reactor();
  ASSERT_TRUE(reactor);
  std::string path = temp_path("partial_write");
  Fd fd(path, O_RDWR | O_CREAT | O_TRUNC);
  ASSERT_GE(fd.get(), 0);
  constexpr size_t kLimit = 5000;
  std::vector<std::byte> data = pattern(0, 8192, 21);
  int r;
  {
    FileSizeLimit limit(kLimit);
    ASSERT_TRUE(limit.ok());
    r = sync_wait(*reactor, write_at(fd.get(), data.data(), data.size(), 0));
  }
  EXPECT_EQ(r, -EFBIG);
  EXPECT_EQ(file_size(path), static_cast<int64_t>(kLimit));
  EXPECT_TRUE(SameBytes(pread_all(path, 0, 8192), pattern(0, kLimit, 21)));
}

TEST(PartialWrites, WritevCutShortMidIovecKeepsThePrefixByteForByte) {
  auto reactor = make_reactor();
  ASSERT_TRUE(reactor);
  std::string path = temp_path("partial_writev");
  Fd fd(path, O_RDWR | O_CREAT | O_TRUNC);
  ASSERT_GE(fd.get(), 0);
  constexpr size_t kLimit = 5000;
  std::vector<std::byte> data = pattern(0, 8192, 23);
  std::vector<iovec> iov = split(data, {3000, 3000, 2192});  // limit inside the 2nd
  int r;
  {
    FileSizeLimit limit(kLimit);
    ASSERT_TRUE(limit.ok());
    r = sync_wait(*reactor, writev_at(fd.get(), iov, 0));
  }
  EXPECT_EQ(r, -EFBIG);
  std::vector<std::byte> got = pread_all(path, 0, 8192);
  ASSERT_EQ(got.size(), kLimit);
  for (size_t i = 0; i < kLimit; ++i) ASSERT_EQ(got[i], pattern_byte(i, 23)) << "byte " << i;
}

// ---- timeouts and no-ops ------------------------------------------------------

TEST(Timeout, CompletesWithZeroAfterAtLeastTheDelay) {
  auto reactor = make_reactor();
  ASSERT_TRUE(reactor);
  constexpr auto kDelay = std::chrono::milliseconds(20);
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(sync_wait(*reactor, sleep_ns(std::chrono::nanoseconds(kDelay).count())), 0);
  EXPECT_GE(std::chrono::steady_clock::now() - start, kDelay);
}

Task<void> sleep_then_record(uint64_t ns, int id, std::vector<int>* order) {
  int r = co_await uring::sleep_for_ns(ns);
  EXPECT_EQ(r, 0);
  order->push_back(id);
}

// A short timeout submitted after a long one still completes first: timeouts
// run concurrently and do not block the ring.
TEST(Timeout, ShorterTimeoutFinishesFirst) {
  auto reactor = make_reactor();
  ASSERT_TRUE(reactor);
  std::vector<int> order;
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    g.spawn(sleep_then_record(300'000'000, 1, &order));
    g.spawn(sleep_then_record(1'000'000, 2, &order));
    co_await g.join();
  };
  sync_wait(*reactor, body());
  EXPECT_EQ(order, (std::vector<int>{2, 1}));
}

// NOPs complete during the submit, so batching is exact: every loop turn
// moves a full SQ from the pending list and submits it with one enter.
TEST(Nop, ThousandsThroughAnEightEntrySqTakeOneEnterPerFullSq) {
  constexpr unsigned kEntries = 8;
  constexpr int kNops = 4096;
  auto reactor = make_reactor(kEntries);
  ASSERT_TRUE(reactor);
  int zeros = 0;
  auto one = [](int* z) -> Task<void> {
    int r = co_await uring::nop();
    if (r == 0) ++*z;
  };
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    for (int i = 0; i < kNops; ++i) g.spawn(one(&zeros));
    co_await g.join();
  };
  sync_wait(*reactor, body());
  EXPECT_EQ(zeros, kNops);
  const ReactorStats& s = reactor->stats();
  EXPECT_EQ(s.sq_full, static_cast<uint64_t>(kNops - kEntries));
  EXPECT_EQ(s.submitted, static_cast<uint64_t>(kNops));
  EXPECT_EQ(s.completions, static_cast<uint64_t>(kNops));
  EXPECT_LE(s.enters, kNops / kEntries + 1);
}

// ---- sync_wait with I/O -----------------------------------------------------------

// Copies `len` bytes between descriptors in 1000-byte steps; returns the
// number of bytes copied or -errno.
Task<Result<size_t>> copy_range(int from, int to, size_t len) {
  std::vector<std::byte> buf(1000);
  size_t done = 0;
  while (done < len) {
    size_t n = std::min(buf.size(), len - done);
    int r = co_await uring::read(from, buf.data(), n, done);
    if (r < 0) co_return errno_error(r, "read");
    r = co_await uring::write(to, buf.data(), n, done);
    if (r < 0) co_return errno_error(r, "write");
    done += n;
  }
  int r = co_await uring::fdatasync(to);
  if (r < 0) co_return errno_error(r, "fdatasync");
  co_return done;
}

TEST(SyncWait, DrivesATaskDoingIoAndReturnsItsValue) {
  auto reactor = make_reactor();
  ASSERT_TRUE(reactor);
  std::string src = temp_path("copy_src");
  std::string dst = temp_path("copy_dst");
  ASSERT_TRUE(pwrite_all(src, 0, pattern(0, 12345, 31)));
  Fd in(src, O_RDONLY);
  Fd out(dst, O_WRONLY | O_CREAT | O_TRUNC);
  ASSERT_GE(in.get(), 0);
  ASSERT_GE(out.get(), 0);

  Result<size_t> copied = sync_wait(*reactor, copy_range(in.get(), out.get(), 12345));
  ASSERT_TRUE(copied.ok()) << copied.error().message();
  EXPECT_EQ(*copied, 12345u);
  EXPECT_TRUE(SameBytes(pread_all(dst, 0, 20000), pattern(0, 12345, 31)));

  // The error path comes back as a value too.
  Result<size_t> failed = sync_wait(*reactor, copy_range(in.get(), -1, 10));
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.error().code(), EBADF);
}

TEST(SyncWait, WhenAllOverIo) {
  auto reactor = make_reactor(8);
  ASSERT_TRUE(reactor);
  std::string path = temp_path("when_all");
  ASSERT_TRUE(pwrite_all(path, 0, pattern(0, 64 * 1024, 41)));
  Fd fd(path, O_RDONLY);
  ASSERT_GE(fd.get(), 0);

  std::vector<std::vector<std::byte>> bufs(64, std::vector<std::byte>(1024));
  std::vector<Task<int>> reads;
  for (size_t i = 0; i < bufs.size(); ++i) {
    reads.push_back(read_at(fd.get(), bufs[i].data(), 1024, i * 1024));
  }
  std::vector<int> results = sync_wait(*reactor, when_all(std::move(reads)));
  ASSERT_EQ(results.size(), 64u);
  for (size_t i = 0; i < bufs.size(); ++i) {
    EXPECT_EQ(results[i], 0);
    EXPECT_TRUE(SameBytes(bufs[i], pattern(i * 1024, 1024, 41))) << "block " << i;
  }
}

}  // namespace
}  // namespace uqcow::uring

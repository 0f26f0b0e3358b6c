// Tests of the raw file driver in both cache modes. writeback goes through the
// page cache; none opens with O_DIRECT, so every unaligned request goes
// through the driver's bounce buffers. File contents are checked with plain
// pread(2) on a separate descriptor, independent of the driver.
#include "uring/raw_file.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/result.h"
#include "engine/sync_wait.h"
#include "engine/task.h"
#include "engine/task_group.h"
#include "uring/aligned_buffer.h"
#include "uring/ops.h"
#include "uring/reactor.h"

namespace uqcow {
namespace {

// ---- helpers (plain syscalls: the oracle) ---------------------------------

std::string temp_path(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  std::string path = std::string(dir && *dir ? dir : "/tmp") + "/" + name;
  ::unlink(path.c_str());
  return path;
}

// The byte a pattern with `seed` holds at file position `pos`: data that
// lands at the wrong offset, or stale data, does not match.
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

std::vector<std::byte> zeros(size_t len) { return std::vector<std::byte>(len, std::byte{0}); }

std::vector<std::byte> concat(std::vector<std::byte> a, const std::vector<std::byte>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
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

int64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

// A buffer aligned for O_DIRECT holding the pattern.
AlignedBuffer aligned_pattern(uint64_t pos, size_t len, uint32_t seed) {
  AlignedBuffer b(len);
  std::vector<std::byte> p = pattern(pos, len, seed);
  std::copy(p.begin(), p.end(), b.data());
  return b;
}

// A deliberately misaligned view of `len` bytes: one byte into `storage`.
std::span<std::byte> odd_span(std::vector<std::byte>& storage, size_t len) {
  storage.assign(len + 1, std::byte{0xAA});
  return std::span<std::byte>(storage.data() + 1, len);
}

std::vector<std::byte> to_vector(std::span<const std::byte> s) { return {s.begin(), s.end()}; }

std::string cache_name(CacheMode mode) { return mode == CacheMode::kNone ? "none" : "writeback"; }

// ---- fixture: a reactor and a fresh file in the cache mode under test ------

class RawFileTest : public ::testing::TestWithParam<CacheMode> {
 protected:
  void SetUp() override {
    auto r = uring::Reactor::create(uring::ReactorOptions{.entries = 64});
    ASSERT_TRUE(r.ok()) << r.error().message();
    reactor_ = std::move(r).value();
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::replace(name.begin(), name.end(), '/', '_');
    path_ = temp_path(name);
    auto f = RawFile::open(path_, options());
    if (!f.ok() && GetParam() == CacheMode::kNone && f.error().code() == EINVAL) {
      GTEST_SKIP() << "O_DIRECT is not supported on $TEST_TMPDIR's file system: "
                   << f.error().message();
    }
    ASSERT_TRUE(f.ok()) << f.error().message();
    file_ = std::move(f).value();
  }

  RawFileOptions options(bool read_only = false) const {
    RawFileOptions o;
    o.create = !read_only;
    o.read_only = read_only;
    o.cache = GetParam();
    return o;
  }

  template <class T>
  T run(Task<T> task) {
    return sync_wait(*reactor_, std::move(task));
  }

  Status write(uint64_t offset, std::span<const std::byte> data) {
    return run(file_->co_write(offset, data));
  }
  Status write(uint64_t offset, const std::vector<std::byte>& data) {
    return write(offset, std::span<const std::byte>(data));
  }

  // Fills the file with `len` bytes of the pattern through the driver.
  void fill(size_t len, uint32_t seed) {
    AlignedBuffer b = aligned_pattern(0, len, seed);
    Status s = write(0, b.span());
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(file_size(path_), static_cast<int64_t>(len));
  }

  uint64_t length() {
    Result<uint64_t> len = file_->length();
    EXPECT_TRUE(len.ok());
    return len.ok() ? *len : 0;
  }

  std::unique_ptr<uring::Reactor> reactor_;
  std::string path_;
  std::unique_ptr<RawFile> file_;
};

INSTANTIATE_TEST_SUITE_P(CacheModes, RawFileTest,
                         ::testing::Values(CacheMode::kWriteback, CacheMode::kNone),
                         [](const ::testing::TestParamInfo<CacheMode>& info) {
                           return cache_name(info.param);
                         });

TEST_P(RawFileTest, AlignmentMatchesTheCacheMode) {
  uint32_t a = file_->alignment();
  if (GetParam() == CacheMode::kWriteback) {
    EXPECT_EQ(a, 1u);
  } else {
    EXPECT_GE(a, 512u);
    EXPECT_EQ(a & (a - 1), 0u) << "alignment " << a << " is not a power of two";
  }
}

TEST_P(RawFileTest, AlignedWriteAndReadThenFlush) {
  AlignedBuffer data = aligned_pattern(0, 64 * 1024, 1);
  Status s = write(0, data.span());
  ASSERT_TRUE(s.ok()) << s.message();
  s = run(file_->co_flush());
  EXPECT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 64 * 1024), pattern(0, 64 * 1024, 1)));

  AlignedBuffer back(16 * 1024);
  s = run(file_->co_read(8192, back.span()));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(SameBytes(to_vector(back.span()), pattern(8192, 16 * 1024, 1)));
}

TEST_P(RawFileTest, UnalignedReadsReturnExactlyTheRange) {
  ASSERT_NO_FATAL_FAILURE(fill(64 * 1024, 2));
  struct Case {
    uint64_t offset;
    size_t len;
  };
  // Inside one sector, across sector boundaries, aligned offset with an odd
  // length, ending exactly at EOF.
  for (Case c :
       {Case{3, 100}, Case{4000, 5000}, Case{4096, 1}, Case{511, 8194}, Case{64 * 1024 - 77, 77}}) {
    std::vector<std::byte> storage;
    std::span<std::byte> buf = odd_span(storage, c.len);
    Status s = run(file_->co_read(c.offset, buf));
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_TRUE(SameBytes(to_vector(buf), pattern(c.offset, c.len, 2))) << "offset " << c.offset;
    EXPECT_EQ(storage[0], std::byte{0xAA}) << "wrote before the buffer";
  }
}

TEST_P(RawFileTest, UnalignedWriteKeepsItsNeighbours) {
  ASSERT_NO_FATAL_FAILURE(fill(16 * 1024, 3));
  std::vector<std::byte> storage;
  std::span<std::byte> buf = odd_span(storage, 300);
  std::vector<std::byte> patch = pattern(4000, 300, 4);
  std::copy(patch.begin(), patch.end(), buf.begin());
  Status s = write(4000, buf);  // crosses the 4096 boundary
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 16 * 1024u);
  std::vector<std::byte> want =
      concat(concat(pattern(0, 4000, 3), patch), pattern(4300, 16 * 1024 - 4300, 3));
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 16 * 1024), want));
}

TEST_P(RawFileTest, UnalignedWriteThatExtendsEndsExactlyAtItsEnd) {
  // A 5000-byte file written through the driver: itself an unaligned write.
  std::vector<std::byte> first = pattern(0, 5000, 5);
  Status s = write(0, first);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 5000u);
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 10000), first));

  // Past EOF, leaving a gap that must read as zeros.
  std::vector<std::byte> second = pattern(6000, 100, 6);
  s = write(6000, second);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 6100u);
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 10000), concat(concat(first, zeros(1000)), second)));

  // One byte past EOF, within the file's last sector.
  s = write(6100, std::vector<std::byte>{std::byte{0x5A}});
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 6101u);
  EXPECT_TRUE(SameBytes(pread_all(path_, 6100, 10), std::vector<std::byte>{std::byte{0x5A}}));

  // Entirely before EOF: the length does not change.
  s = write(10, pattern(10, 20, 7));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 6101u);
  EXPECT_TRUE(SameBytes(pread_all(path_, 10, 20), pattern(10, 20, 7)));
}

TEST_P(RawFileTest, ReadPastEofZeroFills) {
  ASSERT_NO_FATAL_FAILURE(fill(8192, 8));
  ASSERT_TRUE(file_->truncate(5000).ok());

  // Unaligned, crossing EOF.
  std::vector<std::byte> storage;
  std::span<std::byte> buf = odd_span(storage, 8000);
  Status s = run(file_->co_read(4000, buf));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(SameBytes(to_vector(buf), concat(pattern(4000, 1000, 8), zeros(7000))));

  // Aligned, crossing EOF (a short O_DIRECT read in none mode).
  AlignedBuffer aligned(8192);
  std::fill_n(aligned.data(), aligned.size(), std::byte{0xAA});
  s = run(file_->co_read(4096, aligned.span()));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(
      SameBytes(to_vector(aligned.span()), concat(pattern(4096, 904, 8), zeros(8192 - 904))));

  // Aligned, wholly past EOF.
  std::fill_n(aligned.data(), aligned.size(), std::byte{0xAA});
  s = run(file_->co_read(1 << 20, aligned.span()));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(SameBytes(to_vector(aligned.span()), zeros(8192)));
  EXPECT_EQ(length(), 5000u) << "reading must not extend the file";
}

// iovecs over `buf` with the given sizes.
std::vector<iovec> split(std::byte* buf, const std::vector<size_t>& sizes) {
  std::vector<iovec> iov;
  for (size_t n : sizes) {
    iov.push_back(iovec{buf, n});
    buf += n;
  }
  return iov;
}

TEST_P(RawFileTest, VectoredAlignedIovecs) {
  AlignedBuffer data = aligned_pattern(8192, 5 * 4096, 9);
  std::vector<iovec> iov = split(data.data(), {4096, 8192, 4096, 4096});
  Status s = run(file_->co_writev(8192, iov));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 8192u + 5 * 4096);
  EXPECT_TRUE(
      SameBytes(pread_all(path_, 0, 64 * 1024), concat(zeros(8192), pattern(8192, 5 * 4096, 9))));

  AlignedBuffer back(5 * 4096);
  std::fill_n(back.data(), back.size(), std::byte{0xAA});
  std::vector<iovec> riov = split(back.data(), {12288, 4096, 4096});
  s = run(file_->co_readv(8192, riov));
  ASSERT_TRUE(s.ok()) << s.message();
  for (size_t i = 0; i < back.size(); ++i) {
    ASSERT_EQ(back.data()[i], pattern_byte(8192 + i, 9)) << "byte " << i;
  }
}

TEST_P(RawFileTest, VectoredUnalignedIovecs) {
  ASSERT_NO_FATAL_FAILURE(fill(16 * 1024, 10));
  std::vector<std::byte> data = pattern(1000, 9001, 11);
  std::vector<iovec> iov = split(data.data(), {1, 4095, 4096, 7, 802});
  Status s = run(file_->co_writev(1000, iov));  // [1000, 10001): inside the file
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 16 * 1024u);
  std::vector<std::byte> want =
      concat(concat(pattern(0, 1000, 10), data), pattern(10001, 16 * 1024 - 10001, 10));
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 16 * 1024), want));

  // Read back [999, 10002) scattered over odd-sized pieces.
  std::vector<std::byte> back(9003, std::byte{0xAA});
  std::vector<iovec> riov = split(back.data(), {2, 3000, 1, 6000});
  s = run(file_->co_readv(999, riov));
  ASSERT_TRUE(s.ok()) << s.message();
  for (size_t i = 0; i < back.size(); ++i) {
    ASSERT_EQ(back[i], want[999 + i]) << "byte " << i;
  }
}

// readv with aligned iovecs that cross EOF: data, then zeros.
TEST_P(RawFileTest, VectoredReadAcrossEofZeroFills) {
  ASSERT_NO_FATAL_FAILURE(fill(8192, 12));
  ASSERT_TRUE(file_->truncate(5000).ok());
  AlignedBuffer back(3 * 4096);
  std::fill_n(back.data(), back.size(), std::byte{0xAA});
  std::vector<iovec> iov = split(back.data(), {4096, 4096, 4096});
  Status s = run(file_->co_readv(0, iov));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(
      SameBytes(to_vector(back.span()), concat(pattern(0, 5000, 12), zeros(3 * 4096 - 5000))));
}

TEST_P(RawFileTest, DiscardReadsBackZerosAndKeepsTheLength) {
  ASSERT_NO_FATAL_FAILURE(fill(64 * 1024, 13));
  // Aligned, unaligned, and running past EOF (which must not extend the file).
  Status s = run(file_->co_discard(8192, 8192));
  ASSERT_TRUE(s.ok()) << s.message();
  s = run(file_->co_discard(100, 1000));
  ASSERT_TRUE(s.ok()) << s.message();
  s = run(file_->co_discard(60000, 100000));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 64 * 1024u);

  std::vector<std::byte> want = pattern(0, 64 * 1024, 13);
  std::fill(want.begin() + 100, want.begin() + 1100, std::byte{0});
  std::fill(want.begin() + 8192, want.begin() + 16384, std::byte{0});
  std::fill(want.begin() + 60000, want.end(), std::byte{0});
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 64 * 1024), want));

  // Through the driver as well (none mode reads around the page cache).
  AlignedBuffer back(64 * 1024);
  s = run(file_->co_read(0, back.span()));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(SameBytes(to_vector(back.span()), want));
}

TEST_P(RawFileTest, DiscardDeallocates) {
  constexpr size_t kLen = 1 << 20;
  ASSERT_NO_FATAL_FAILURE(fill(kLen, 14));
  Status s = run(file_->co_flush());
  ASSERT_TRUE(s.ok()) << s.message();
  Result<uint64_t> before = file_->allocated_bytes();
  ASSERT_TRUE(before.ok());
  ASSERT_GE(*before, kLen) << "the file system did not allocate the written data";
  s = run(file_->co_discard(0, kLen));
  ASSERT_TRUE(s.ok()) << s.message();
  Result<uint64_t> after = file_->allocated_bytes();
  ASSERT_TRUE(after.ok());
  EXPECT_LT(*after, *before);
  EXPECT_EQ(length(), kLen);
}

TEST_P(RawFileTest, WriteZeroesInsideTheFileKeepsTheLength) {
  ASSERT_NO_FATAL_FAILURE(fill(64 * 1024, 15));
  Status s = run(file_->co_write_zeroes(4096, 8192, /*may_unmap=*/true));
  ASSERT_TRUE(s.ok()) << s.message();
  s = run(file_->co_write_zeroes(20000, 5000, /*may_unmap=*/false));
  ASSERT_TRUE(s.ok()) << s.message();
  s = run(file_->co_write_zeroes(30001, 77, /*may_unmap=*/true));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 64 * 1024u);

  std::vector<std::byte> want = pattern(0, 64 * 1024, 15);
  std::fill(want.begin() + 4096, want.begin() + 12288, std::byte{0});
  std::fill(want.begin() + 20000, want.begin() + 25000, std::byte{0});
  std::fill(want.begin() + 30001, want.begin() + 30078, std::byte{0});
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 64 * 1024), want));
}

TEST_P(RawFileTest, WriteZeroesPastEofExtendsTheFile) {
  for (bool may_unmap : {true, false}) {
    SCOPED_TRACE(may_unmap ? "may_unmap" : "no unmap");
    ASSERT_TRUE(file_->truncate(0).ok());
    ASSERT_NO_FATAL_FAILURE(fill(8192, 16));
    // Straddling EOF.
    Status s = run(file_->co_write_zeroes(6000, 4000, may_unmap));
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_EQ(length(), 10000u);
    // Wholly past EOF, leaving a hole.
    s = run(file_->co_write_zeroes(20000, 3333, may_unmap));
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_EQ(length(), 23333u);
    EXPECT_TRUE(
        SameBytes(pread_all(path_, 0, 30000), concat(pattern(0, 6000, 16), zeros(23333 - 6000))));
  }
}

TEST_P(RawFileTest, TruncateAndLength) {
  EXPECT_EQ(length(), 0u);
  ASSERT_NO_FATAL_FAILURE(fill(64 * 1024, 17));
  EXPECT_EQ(length(), 64 * 1024u);

  Status s = file_->truncate(12345);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 12345u);
  EXPECT_EQ(file_size(path_), 12345);

  s = file_->truncate(100000);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(length(), 100000u);
  // The bytes cut off by the shrink come back as zeros, not as old data.
  AlignedBuffer back(100000);
  s = run(file_->co_read(0, back.span()));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(
      SameBytes(to_vector(back.span()), concat(pattern(0, 12345, 17), zeros(100000 - 12345))));
}

Task<void> write_piece(RawFile& f, uint64_t offset, size_t len, uint32_t seed, int* failures) {
  std::vector<std::byte> data = pattern(offset, len, seed);
  Status s = co_await f.co_write(offset, data);
  if (!s.ok()) ++*failures;
}

// Many unaligned writes at once whose sectors overlap (7-byte pieces, so ~585
// of them share each 4 KiB sector). In none mode each is a read-modify-write
// of whole sectors; none may lose another's bytes.
TEST_P(RawFileTest, ConcurrentUnalignedWritesSharingSectorsAllLand) {
  constexpr size_t kPieces = 2000;
  constexpr size_t kPiece = 7;
  int failures = 0;
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    for (size_t i = 0; i < kPieces; ++i) {
      g.spawn(write_piece(*file_, i * kPiece, kPiece, 18, &failures));
    }
    co_await g.join();
  };
  run(body());
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(length(), kPieces * kPiece);
  EXPECT_TRUE(
      SameBytes(pread_all(path_, 0, 2 * kPieces * kPiece), pattern(0, kPieces * kPiece, 18)));
}

// Once the loop has turned (a NOP round trip), extends the file by a plain
// pwrite(2) on a descriptor of its own: another writer whose extension
// completes while a bounced write that started earlier is still in flight.
Task<void> extend_after_one_turn(const std::string& path, uint64_t offset,
                                 std::vector<std::byte> data, int* failures) {
  int r = co_await uring::nop();
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  bool ok = r == 0 && fd >= 0 &&
            ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset)) ==
                static_cast<ssize_t>(data.size());
  if (fd >= 0) ::close(fd);
  if (!ok) ++*failures;
}

// The unaligned write at 4000 takes its length snapshot (5000) and suspends
// on its read-modify-write read; the file is then extended to 12288 before
// that bounced write completes. In none mode the bounced write covers whole
// sectors, up to 8192, and trims the file back afterwards; the trim must not
// cut off the other writer's data.
TEST_P(RawFileTest, BouncedWriteKeepsAnExtensionMadeWhileInFlight) {
  ASSERT_NO_FATAL_FAILURE(fill(8192, 19));
  ASSERT_TRUE(file_->truncate(5000).ok());
  int failures = 0;
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    g.spawn(write_piece(*file_, 4000, 100, 21, &failures));
    g.spawn(extend_after_one_turn(path_, 8192, pattern(8192, 4096, 20), &failures));
    co_await g.join();
  };
  run(body());
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(length(), 12288u);
  std::vector<std::byte> want =
      concat(concat(pattern(0, 4000, 19), pattern(4000, 100, 21)), pattern(4100, 900, 19));
  want = concat(concat(want, zeros(8192 - 5000)), pattern(8192, 4096, 20));
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 16384), want));
}

// ---- read-only files --------------------------------------------------------

TEST_P(RawFileTest, ReadOnlyFileRejectsEveryWriteWithErofs) {
  ASSERT_NO_FATAL_FAILURE(fill(8192, 22));
  file_.reset();
  auto opened = RawFile::open(path_, options(/*read_only=*/true));
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  std::unique_ptr<RawFile> ro = std::move(opened).value();
  EXPECT_TRUE(ro->read_only());

  AlignedBuffer data = aligned_pattern(0, 4096, 23);
  Status s = run(ro->co_write(0, data.span()));
  EXPECT_EQ(s.code(), EROFS) << s.message();
  std::vector<iovec> iov = split(data.data(), {4096});
  s = run(ro->co_writev(0, iov));
  EXPECT_EQ(s.code(), EROFS) << s.message();
  s = run(ro->co_discard(0, 4096));
  EXPECT_EQ(s.code(), EROFS) << s.message();
  s = run(ro->co_write_zeroes(0, 4096, true));
  EXPECT_EQ(s.code(), EROFS) << s.message();
  EXPECT_EQ(ro->truncate(0).code(), EROFS);

  // Reads and flush work; nothing changed.
  AlignedBuffer back(8192);
  s = run(ro->co_read(0, back.span()));
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(SameBytes(to_vector(back.span()), pattern(0, 8192, 22)));
  EXPECT_TRUE(run(ro->co_flush()).ok());
  EXPECT_TRUE(SameBytes(pread_all(path_, 0, 16384), pattern(0, 8192, 22)));
}

// ---- opening ------------------------------------------------------------------

TEST(RawFileOpen, ReportsErrnoForBadPaths) {
  std::string missing = temp_path("does_not_exist");
  auto r = RawFile::open(missing, RawFileOptions{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ENOENT);

  std::string dir = temp_path("a_directory");
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  RawFileOptions ro;
  ro.read_only = true;
  r = RawFile::open(dir, ro);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), EISDIR);
  ::rmdir(dir.c_str());

  std::string existing = temp_path("exists");
  RawFileOptions create;
  create.create = true;
  ASSERT_TRUE(RawFile::open(existing, create).ok());
  create.exclusive = true;
  r = RawFile::open(existing, create);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), EEXIST);
}

TEST(ParseCacheMode, AcceptsWritebackAndNoneOnly) {
  auto wb = parse_cache_mode("writeback");
  ASSERT_TRUE(wb.ok());
  EXPECT_EQ(*wb, CacheMode::kWriteback);
  auto none = parse_cache_mode("none");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, CacheMode::kNone);
  for (const char* bad : {"writethrough", "directsync", "unsafe", ""}) {
    auto r = parse_cache_mode(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().code(), EINVAL);
  }
}

}  // namespace
}  // namespace uqcow

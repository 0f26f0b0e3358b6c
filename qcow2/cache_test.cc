// Unit tests of MetadataCache over a RawFile with known content, on a real
// reactor. The file is wrapped in a device that counts and can fail reads, so
// "read from the file" and "served from memory" are told apart from outside
// the cache. LRU behaviour is also checked against a small in-test model.
#include "qcow2/cache.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "engine/result.h"
#include "engine/sync_wait.h"
#include "engine/task.h"
#include "engine/when_all.h"
#include "uring/block_device.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow::qcow2 {
namespace {

constexpr uint64_t kFileSize = 1 << 20;

// The byte the test file holds at `pos`: differs between neighbouring 512-byte
// blocks and within them, so an entry read from the wrong offset shows.
uint8_t file_byte(uint64_t pos) {
  uint64_t x = (pos + 1) * 0x9E3779B97F4A7C15ull;
  return static_cast<uint8_t>((x >> 29) ^ (pos >> 9));
}

// Forwards to a RawFile, counting reads and writes; can fail the next read.
class CountingDevice final : public BlockDevice {
 public:
  explicit CountingDevice(BlockDevice& inner) : inner_(inner) {}

  Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override {
    ++reads;
    last_read_offset = offset;
    last_read_length = buf.size();
    if (fail_next_read) {
      fail_next_read = false;
      co_return Error(EIO, "injected read error");
    }
    co_return co_await inner_.co_read(offset, buf);
  }
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override {
    ++writes;
    return inner_.co_write(offset, buf);
  }
  Task<Status> co_readv(uint64_t offset, std::span<iovec> iov) override {
    ++reads;
    return inner_.co_readv(offset, iov);
  }
  Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) override {
    ++writes;
    return inner_.co_writev(offset, iov);
  }
  Task<Status> co_flush() override { return inner_.co_flush(); }
  Task<Status> co_discard(uint64_t offset, uint64_t len) override { return inner_.co_discard(offset, len); }
  Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override {
    return inner_.co_write_zeroes(offset, len, may_unmap);
  }
  Result<uint64_t> length() const override { return inner_.length(); }
  Result<uint64_t> allocated_bytes() const override { return inner_.allocated_bytes(); }
  Status truncate(uint64_t length) override { return inner_.truncate(length); }
  uint32_t alignment() const override { return inner_.alignment(); }
  bool read_only() const override { return inner_.read_only(); }
  const std::string& name() const override { return inner_.name(); }

  int reads = 0;
  int writes = 0;
  uint64_t last_read_offset = 0;
  uint64_t last_read_length = 0;
  bool fail_next_read = false;

 private:
  BlockDevice& inner_;
};

class CacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto reactor = uring::Reactor::create();
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    reactor_ = std::move(reactor).value();

    const char* dir = std::getenv("TEST_TMPDIR");
    std::string tmpl = std::string(dir && *dir ? dir : "/tmp") + "/cache_test.XXXXXX";
    int fd = mkstemp(tmpl.data());
    ASSERT_GE(fd, 0) << tmpl;
    path_ = tmpl;
    std::vector<uint8_t> content(kFileSize);
    for (uint64_t i = 0; i < kFileSize; ++i) content[i] = file_byte(i);
    ASSERT_EQ(::pwrite(fd, content.data(), content.size(), 0), static_cast<ssize_t>(content.size()));
    ::close(fd);

    auto file = RawFile::open(path_, RawFileOptions{.read_only = false});
    ASSERT_TRUE(file.ok()) << file.error().message();
    file_ = std::move(file).value();
    device_ = std::make_unique<CountingDevice>(*file_);
  }

  void TearDown() override {
    device_.reset();
    file_.reset();
    ::unlink(path_.c_str());
  }

  std::unique_ptr<MetadataCache> make(uint32_t entry_size, uint32_t capacity) {
    auto c = MetadataCache::create("L2", *device_, entry_size, capacity);
    EXPECT_TRUE(c.ok()) << c.error().message();
    return c.ok() ? std::move(c).value() : nullptr;
  }

  template <class T>
  T run(Task<T> task) {
    return sync_wait(*reactor_, std::move(task));
  }

  Result<MetadataCache::Ref> get(MetadataCache& cache, uint64_t offset, bool fresh = false) {
    return run(cache.get(offset, fresh));
  }

  // Gets and releases at once (the entry stays cached, unpinned).
  void touch(MetadataCache& cache, uint64_t offset) {
    auto ref = get(cache, offset);
    ASSERT_TRUE(ref.ok()) << ref.error().message();
  }

  // The file's bytes, read with pread: the oracle.
  std::vector<uint8_t> file_bytes(uint64_t offset, size_t len) {
    std::vector<uint8_t> out(len);
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::pread(fd, out.data(), len, static_cast<off_t>(offset)), static_cast<ssize_t>(len));
    ::close(fd);
    return out;
  }

  std::vector<uint8_t> entry_bytes(const uint8_t* p, size_t len) { return std::vector<uint8_t>(p, p + len); }

  std::unique_ptr<uring::Reactor> reactor_;
  std::string path_;
  std::unique_ptr<RawFile> file_;
  std::unique_ptr<CountingDevice> device_;
};

using Offsets = std::vector<uint64_t>;

TEST_F(CacheTest, MissReadsTheFileThenHitsServeFromMemory) {
  auto cache = make(4096, 4);
  ASSERT_TRUE(cache);
  {
    auto ref = get(*cache, 8192);
    ASSERT_TRUE(ref.ok()) << ref.error().message();
    EXPECT_EQ(entry_bytes(ref->data(), 4096), file_bytes(8192, 4096));
    EXPECT_EQ(ref->offset(), 8192u);
  }
  EXPECT_EQ(cache->stats().misses, 1u);
  EXPECT_EQ(cache->stats().hits, 0u);
  EXPECT_EQ(device_->reads, 1);

  {
    auto ref = get(*cache, 8192);
    ASSERT_TRUE(ref.ok());
    EXPECT_EQ(entry_bytes(ref->data(), 4096), file_bytes(8192, 4096));
  }
  EXPECT_EQ(cache->stats().hits, 1u);
  EXPECT_EQ(cache->stats().misses, 1u);
  EXPECT_EQ(device_->reads, 1) << "a hit must not read the file";

  const uint8_t* p = cache->lookup(8192);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(entry_bytes(p, 4096), file_bytes(8192, 4096));
  EXPECT_EQ(cache->stats().hits, 2u);

  EXPECT_EQ(cache->lookup(4096), nullptr) << "never loaded";
  EXPECT_EQ(cache->stats().misses, 1u) << "a lookup() miss is counted by the get() that follows it";
  EXPECT_EQ(device_->reads, 1) << "lookup() never does I/O";
  EXPECT_EQ(cache->size(), 1u);
}

class CacheSliceTest : public CacheTest, public ::testing::WithParamInterface<uint32_t> {};

TEST_P(CacheSliceTest, EntriesHoldTheFileBytesAtTheirOffset) {
  const uint32_t entry = GetParam();
  auto cache = make(entry, 8);
  ASSERT_TRUE(cache);
  for (uint64_t index : {0, 1, 3, 7, 100, 255}) {
    const uint64_t offset = index * entry;
    SCOPED_TRACE("entry at " + std::to_string(offset));
    const int reads_before = device_->reads;
    auto ref = get(*cache, offset);
    ASSERT_TRUE(ref.ok()) << ref.error().message();
    EXPECT_EQ(entry_bytes(ref->data(), entry), file_bytes(offset, entry));
    EXPECT_EQ(device_->reads, reads_before + 1);
    EXPECT_EQ(device_->last_read_offset, offset);
    EXPECT_EQ(device_->last_read_length, entry) << "one read of exactly one entry";
  }
  // Neighbouring entries do not share bytes: the second lookup of each is a
  // hit with the right content even after the others were loaded.
  for (uint64_t index : {100, 255}) {
    const uint8_t* p = cache->lookup(index * entry);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(entry_bytes(p, entry), file_bytes(index * entry, entry));
  }
}

INSTANTIATE_TEST_SUITE_P(EntrySizes, CacheSliceTest, ::testing::Values(512u, 4096u),
                         [](const ::testing::TestParamInfo<uint32_t>& info) {
                           return "entry" + std::to_string(info.param);
                         });

TEST_F(CacheTest, CreateRefusesBadEntrySizesAndZeroCapacity) {
  EXPECT_FALSE(MetadataCache::create("L2", *device_, 256, 4).ok());
  EXPECT_FALSE(MetadataCache::create("L2", *device_, 1000, 4).ok());
  EXPECT_FALSE(MetadataCache::create("L2", *device_, 4096, 0).ok());
}

TEST_F(CacheTest, EvictsLeastRecentlyUsedFirst) {
  auto cache = make(512, 3);
  ASSERT_TRUE(cache);
  const uint64_t A = 0, B = 512, C = 4096, D = 65536, E = 512 * 1000;
  for (uint64_t o : {A, B, C}) ASSERT_NO_FATAL_FAILURE(touch(*cache, o));
  EXPECT_EQ(cache->lru_order(), (Offsets{C, B, A}));

  ASSERT_NE(cache->lookup(A), nullptr);  // lookup() counts as a use
  EXPECT_EQ(cache->lru_order(), (Offsets{A, C, B}));
  ASSERT_NO_FATAL_FAILURE(touch(*cache, B));  // so does a get() hit
  EXPECT_EQ(cache->lru_order(), (Offsets{B, A, C}));

  ASSERT_NO_FATAL_FAILURE(touch(*cache, D));
  EXPECT_EQ(cache->lru_order(), (Offsets{D, B, A})) << "C was the least recently used";
  EXPECT_EQ(cache->stats().evictions, 1u);
  EXPECT_EQ(cache->lookup(C), nullptr);

  ASSERT_NO_FATAL_FAILURE(touch(*cache, E));
  EXPECT_EQ(cache->lru_order(), (Offsets{E, D, B}));
  EXPECT_EQ(cache->stats().evictions, 2u);

  // An evicted entry comes back from the file, correctly.
  const int reads_before = device_->reads;
  auto ref = get(*cache, C);
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(device_->reads, reads_before + 1);
  EXPECT_EQ(entry_bytes(ref->data(), 512), file_bytes(C, 512));
}

// A random sequence of get()/lookup() against a list model of an LRU cache:
// order, contents, hit/miss/eviction counts and file reads must all agree.
TEST_F(CacheTest, MatchesAnLruModelOverARandomWorkload) {
  constexpr uint32_t kCapacity = 7;
  auto cache = make(512, kCapacity);
  ASSERT_TRUE(cache);
  std::list<uint64_t> model;  // most recent first
  uint64_t hits = 0, misses = 0, evictions = 0;
  int reads = 0;
  std::mt19937 rng(20240611);
  for (int step = 0; step < 3000; ++step) {
    const uint64_t offset = uint64_t{rng() % 23} * 4096 + (rng() % 2) * 512;
    const bool use_lookup = rng() % 3 == 0;
    SCOPED_TRACE("step " + std::to_string(step) + (use_lookup ? " lookup " : " get ") + std::to_string(offset));
    auto it = std::find(model.begin(), model.end(), offset);
    const bool cached = it != model.end();
    if (cached) {
      ++hits;
      model.erase(it);
      model.push_front(offset);
    } else if (!use_lookup) {  // a lookup() miss is left to the caller's get()
      ++misses;
      ++reads;
      if (model.size() == kCapacity) {
        model.pop_back();
        ++evictions;
      }
      model.push_front(offset);
    }
    const uint8_t* p = nullptr;
    std::vector<uint8_t> got;
    if (use_lookup) {
      p = cache->lookup(offset);
      ASSERT_EQ(p != nullptr, cached);
      if (p) got = entry_bytes(p, 512);
    } else {
      auto ref = get(*cache, offset);
      ASSERT_TRUE(ref.ok()) << ref.error().message();
      got = entry_bytes(ref->data(), 512);
    }
    if (!got.empty()) {
      ASSERT_EQ(got, file_bytes(offset, 512));
    }
    ASSERT_EQ(cache->lru_order(), Offsets(model.begin(), model.end()));
    ASSERT_EQ(cache->stats().hits, hits);
    ASSERT_EQ(cache->stats().misses, misses);
    ASSERT_EQ(cache->stats().evictions, evictions);
    ASSERT_EQ(device_->reads, reads);
  }
}

TEST_F(CacheTest, PinnedEntriesAreNotEvictedAndAllPinnedIsEbusy) {
  auto cache = make(512, 2);
  ASSERT_TRUE(cache);
  const uint64_t A = 0, B = 1024, C = 2048, D = 3072;
  auto a = get(*cache, A);
  ASSERT_TRUE(a.ok());
  ASSERT_NO_FATAL_FAILURE(touch(*cache, B));
  EXPECT_EQ(cache->lru_order(), (Offsets{B, A}));

  // A is the least recently used but pinned: B goes.
  auto c = get(*cache, C);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(cache->lru_order(), (Offsets{C, A}));
  EXPECT_EQ(cache->lookup(B), nullptr);
  EXPECT_EQ(entry_bytes(a->data(), 512), file_bytes(A, 512)) << "a pinned entry's bytes stay put";

  // Both entries pinned: nothing can make room.
  const int reads_before = device_->reads;
  auto d = get(*cache, D);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code(), EBUSY) << d.error().message();
  EXPECT_EQ(device_->reads, reads_before);
  EXPECT_EQ(cache->lru_order(), (Offsets{C, A}));
  EXPECT_EQ(entry_bytes(a->data(), 512), file_bytes(A, 512));
  EXPECT_EQ(entry_bytes(c->data(), 512), file_bytes(C, 512));

  // Unpinning A makes it the victim.
  a->reset();
  auto d2 = get(*cache, D);
  ASSERT_TRUE(d2.ok()) << d2.error().message();
  EXPECT_EQ(cache->lru_order(), (Offsets{D, C}));
  EXPECT_EQ(entry_bytes(d2->data(), 512), file_bytes(D, 512));
}

TEST_F(CacheTest, CleanUnusedDropsOnlyEntriesUnusedSinceThePreviousCall) {
  auto cache = make(4096, 4);
  ASSERT_TRUE(cache);
  const uint64_t A = 0, B = 4096, C = 8192;
  ASSERT_NO_FATAL_FAILURE(touch(*cache, A));
  ASSERT_NO_FATAL_FAILURE(touch(*cache, B));
  auto c = get(*cache, C);  // pinned throughout
  ASSERT_TRUE(c.ok());

  EXPECT_EQ(cache->clean_unused(), 0u) << "every entry was used since creation";
  EXPECT_EQ(cache->size(), 3u);

  ASSERT_NE(cache->lookup(A), nullptr);  // A is used again; B and C are not
  EXPECT_EQ(cache->clean_unused(), 1u);
  EXPECT_EQ(cache->stats().cleaned, 1u);
  EXPECT_EQ(cache->lookup(B), nullptr) << "B was unused since the previous call";
  Offsets order = cache->lru_order();
  std::sort(order.begin(), order.end());
  EXPECT_EQ(order, (Offsets{A, C})) << "A was used; C is pinned";

  // No use at all since: A goes, pinned C stays.
  EXPECT_EQ(cache->clean_unused(), 1u);
  EXPECT_EQ(cache->lru_order(), (Offsets{C}));
  EXPECT_EQ(entry_bytes(c->data(), 4096), file_bytes(C, 4096));

  // Once unpinned, C goes at the next call.
  c->reset();
  EXPECT_EQ(cache->clean_unused(), 1u);
  EXPECT_EQ(cache->size(), 0u);
  EXPECT_EQ(cache->stats().cleaned, 3u);

  // A dropped entry reloads from the file (its memory was handed back).
  const int reads_before = device_->reads;
  auto b = get(*cache, B);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(device_->reads, reads_before + 1);
  EXPECT_EQ(entry_bytes(b->data(), 4096), file_bytes(B, 4096));
}

TEST_F(CacheTest, FreshGetIsZeroFilledWithoutReading) {
  auto cache = make(4096, 1);
  ASSERT_TRUE(cache);
  // Fill the only slot with file data first, so stale bytes would show.
  ASSERT_NO_FATAL_FAILURE(touch(*cache, 0));
  const int reads_before = device_->reads;
  ASSERT_NE(file_bytes(65536, 4096), std::vector<uint8_t>(4096, 0)) << "the test file must not be zero there";
  auto ref = get(*cache, 65536, /*fresh=*/true);
  ASSERT_TRUE(ref.ok()) << ref.error().message();
  EXPECT_EQ(entry_bytes(ref->data(), 4096), std::vector<uint8_t>(4096, 0));
  EXPECT_EQ(device_->reads, reads_before) << "a fresh entry is not read from the file";
  EXPECT_EQ(cache->lru_order(), (Offsets{65536}));
  EXPECT_EQ(file_bytes(65536, 4096)[0], file_byte(65536)) << "and the file is untouched";
}

// A table freed and reallocated at the same offset: the new table is fresh,
// whatever the cache still held for the old one (its stale entries would
// otherwise come back as the new table's content).
TEST_F(CacheTest, FreshGetOfACachedEntryIsZeroFilled) {
  auto cache = make(4096, 4);
  ASSERT_TRUE(cache);
  ASSERT_NO_FATAL_FAILURE(touch(*cache, 8192));
  auto ref = get(*cache, 8192, /*fresh=*/true);
  ASSERT_TRUE(ref.ok()) << ref.error().message();
  EXPECT_EQ(entry_bytes(ref->data(), 4096), std::vector<uint8_t>(4096, 0));
}

TEST_F(CacheTest, DiscardRangeDropsEverySliceOfACluster) {
  auto cache = make(4096, 8);
  ASSERT_TRUE(cache);
  for (uint64_t off : {0, 4096, 8192, 12288, 16384}) ASSERT_NO_FATAL_FAILURE(touch(*cache, off));
  cache->discard_range(0, 16384);  // one 16 KiB cluster: four slices
  EXPECT_EQ(cache->lru_order(), (Offsets{16384}));
}

TEST_F(CacheTest, ConcurrentGetsOfOneEntryReadItOnce) {
  auto cache = make(4096, 4);
  ASSERT_TRUE(cache);
  auto [r1, r2] = run(when_all(cache->get(12288), cache->get(12288)));
  ASSERT_TRUE(r1.ok()) << r1.error().message();
  ASSERT_TRUE(r2.ok()) << r2.error().message();
  EXPECT_EQ(r1->data(), r2->data()) << "both refer to the same entry";
  EXPECT_EQ(entry_bytes(r1->data(), 4096), file_bytes(12288, 4096));
  EXPECT_EQ(device_->reads, 1);
  EXPECT_EQ(cache->size(), 1u);
}

TEST_F(CacheTest, AFailedLoadIsReportedAndNotCached) {
  auto cache = make(4096, 4);
  ASSERT_TRUE(cache);
  device_->fail_next_read = true;
  auto bad = get(*cache, 4096);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), EIO);
  EXPECT_NE(bad.error().message().find("injected read error"), std::string::npos) << bad.error().message();
  EXPECT_EQ(cache->size(), 0u);
  EXPECT_EQ(cache->lookup(4096), nullptr);

  auto good = get(*cache, 4096);
  ASSERT_TRUE(good.ok()) << good.error().message();
  EXPECT_EQ(entry_bytes(good->data(), 4096), file_bytes(4096, 4096));
}

TEST_F(CacheTest, DirtyEntriesAreSkippedByEvictionAndWrittenByFlush) {
  auto cache = make(512, 2);
  ASSERT_TRUE(cache);
  const uint64_t A = 1024, B = 2048, C = 4096;
  {
    auto a = get(*cache, A);
    ASSERT_TRUE(a.ok());
    std::memset(a->data(), 0xab, 512);
    cache->mark_dirty(*a);
  }
  EXPECT_TRUE(cache->has_dirty());
  ASSERT_NO_FATAL_FAILURE(touch(*cache, B));
  ASSERT_NO_FATAL_FAILURE(touch(*cache, C));  // A is older but dirty: B goes
  EXPECT_EQ(cache->lru_order(), (Offsets{C, A}));
  EXPECT_EQ(file_bytes(A, 512)[0], file_byte(A)) << "nothing written before flush()";

  Status s = run(cache->flush());
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_FALSE(cache->has_dirty());
  EXPECT_EQ(cache->stats().writebacks, 1u);
  EXPECT_EQ(file_bytes(A, 512), std::vector<uint8_t>(512, 0xab));
  EXPECT_EQ(file_bytes(A + 512, 1)[0], file_byte(A + 512)) << "exactly one entry written";
}

}  // namespace
}  // namespace uqcow::qcow2

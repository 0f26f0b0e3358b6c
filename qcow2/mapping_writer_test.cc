// Unit tests of MappingWriter alone, over the mapping and the refcounts
// of a fresh image (component_fixture.h), with the allocations in flight,
// the freed-cluster queue and a recording copy-on-write source: new
// clusters are linked COPIED and counted; copy-on-write data comes from the
// guest's view around the write (or from the file's zeroing); a COPIED
// cluster is overwritten in place; an entry changed while a write to it was
// in flight is refused; a shared L2 table is copied before it is written;
// damage is fatal before anything is written; zeroing keeps or frees host
// clusters as its mode says; a compressed cluster is linked only where
// nothing is allocated; preallocation links reserved clusters in one run
// and keeps what is there. `qemu-img check` and
// `qemu-io` are the oracles for the image on disk.
#include "qcow2/mapping_writer.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/in_flight.h"
#include "qcow2/component_fixture.h"
#include "qcow2/compress.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {
namespace {

std::vector<std::byte> pattern(size_t n, uint8_t value) { return std::vector<std::byte>(n, std::byte{value}); }

class MappingWriterTest : public ComponentFixture {
 protected:
  void TearDown() override {
    writer_.reset();
    freed_.reset();
    ComponentFixture::TearDown();
  }
  // Sets up the writer; `backing_size`: pretend a backing file of that size
  // (unallocated clusters then need copy-on-write from the guest's view).
  void make_writer(std::optional<uint64_t> backing_size = std::nullopt) {
    freed_.emplace(geo_, *file_, *file_, requests_, *refcounts_, *l2_cache_, *reporter_);
    writer_.emplace(MappingWriter::Parts{.file = *file_,
                                            .data_file = *file_,
                                            .header = header_,
                                            .geo = geo_,
                                            .map = *map_,
                                            .refcounts = *refcounts_,
                                            .inflight = inflight_,
                                            .freed = *freed_,
                                            .overlap = *overlap_,
                                            .reporter = *reporter_,
                                            .lock = lock_},
                    MappingWriter::Options{.backing_size = backing_size},
                    [this](uint64_t guest, std::span<std::byte> out) { return read_guest(guest, out); });
  }
  // The copy-on-write source: records the request, answers cow_byte_, and
  // runs on_cow_ (with the lock released, as the writer calls it).
  Task<Status> read_guest(uint64_t guest, std::span<std::byte> out) {
    cow_reads_.emplace_back(guest, out.size());
    std::fill(out.begin(), out.end(), std::byte{cow_byte_});
    if (on_cow_) co_await on_cow_();
    co_return Status();
  }
  // One write_step at `offset` with the lock held, as the image calls it.
  Result<size_t> write_step(uint64_t offset, const std::vector<std::byte>& data, bool* lock_kept = nullptr) {
    return run([](MappingWriterTest* t, uint64_t offset, const std::vector<std::byte>& data,
                  bool* lock_kept) -> Task<Result<size_t>> {
      auto guard = co_await t->lock_.scoped_lock();
      auto r = co_await t->writer_->write_step(offset, data, guard);
      if (lock_kept) *lock_kept = guard.owns_lock();
      co_return r;
    }(this, offset, data, lock_kept));
  }
  // The mapping of `guest`, its L2 slice loaded if the cache dropped it.
  Mapping mapping(uint64_t guest) {
    Result<Mapping> m = Mapping{};
    if (!map_->map_fast(guest, 1, m)) {
      const uint64_t table = map_->l1().at(geo_.l1_index(guest)) & kL1OffsetMask;
      EXPECT_TRUE(run(l2_cache_->get(map_->slice_offset(table, guest))).ok());
      EXPECT_TRUE(map_->map_fast(guest, 1, m)) << "slice not cached";
    }
    EXPECT_TRUE(m.ok());
    return m.ok() ? *m : Mapping{};
  }
  std::vector<std::byte> file_bytes(uint64_t host, size_t n) {
    std::vector<std::byte> out(n);
    EXPECT_TRUE(run(file_->co_read(host, out)).ok());
    return out;
  }
  // Everything on disk, in dependency order (the image's flush).
  void flush_all() {
    ASSERT_TRUE(run(l2_cache_->flush()).ok());
    flush();
  }
  // The L2 entry of `guest` in the active table, as a writable slice.
  void set_l2_entry(uint64_t guest, uint64_t l2e) {
    const uint64_t table = map_->l1().at(geo_.l1_index(guest)) & kL1OffsetMask;
    ASSERT_NE(table, 0u);
    const uint64_t slice = map_->slice_offset(table, guest);
    auto ref = run(l2_cache_->get(slice));
    ASSERT_TRUE(ref.ok());
    L2Slice(ref->data(), geo_).set_entry(map_->slice_index(guest), l2e);
    l2_cache_->mark_dirty(*ref);
  }

  // zero_clusters() over [offset, offset + len) with the lock held.
  Status zero(uint64_t offset, uint64_t len, MappingWriter::ZeroMode mode,
              std::vector<std::pair<uint64_t, uint64_t>>* by_writing = nullptr) {
    std::vector<std::pair<uint64_t, uint64_t>> ignored;
    return run([](MappingWriterTest* t, uint64_t offset, uint64_t len, MappingWriter::ZeroMode mode,
                  std::vector<std::pair<uint64_t, uint64_t>>& out) -> Task<Status> {
      auto guard = co_await t->lock_.scoped_lock();
      co_return co_await t->writer_->zero_clusters(offset, len, mode, uint64_t{1} << 30, false, out);
    }(this, offset, len, mode, by_writing ? *by_writing : ignored));
  }
  Status write_compressed(uint64_t offset, std::span<const uint8_t> data) {
    return run([](MappingWriterTest* t, uint64_t offset, std::span<const uint8_t> data) -> Task<Status> {
      auto guard = co_await t->lock_.scoped_lock();
      co_return co_await t->writer_->write_compressed_step(offset, data, guard);
    }(this, offset, data));
  }

  Status preallocate(uint64_t start, uint64_t end, bool fresh, std::vector<MappingWriter::HostRun>& runs) {
    return run([](MappingWriterTest* t, uint64_t start, uint64_t end, bool fresh,
                  std::vector<MappingWriter::HostRun>& runs) -> Task<Status> {
      auto guard = co_await t->lock_.scoped_lock();
      co_return co_await t->writer_->preallocate(start, end, fresh, runs);
    }(this, start, end, fresh, runs));
  }

  InFlightTracker requests_;
  AllocationsInFlight inflight_{kCluster};
  std::optional<FreedClusters> freed_;
  CoMutex lock_;
  std::optional<MappingWriter> writer_;
  std::vector<std::pair<uint64_t, uint64_t>> cow_reads_;
  uint8_t cow_byte_ = 0x5a;
  std::function<Task<void>()> on_cow_;
};

TEST_F(MappingWriterTest, NewClustersAreLinkedCopiedAndCounted) {
  make_writer();
  const uint64_t at = (1 << 20) + 4096;
  auto done = write_step(at, pattern(4096, 0xab));
  ASSERT_TRUE(done.ok()) << done.error().message();
  EXPECT_EQ(*done, 4096u);
  EXPECT_NE(map_->l1().at(0) & kOflagCopied, 0u) << "a fresh L2 table has refcount 1";
  const Mapping m = mapping(at);
  EXPECT_EQ(m.type, SubclusterType::kNormal);
  EXPECT_TRUE(m.copied);
  const uint64_t host = m.host_offset - 4096;
  EXPECT_EQ(refcount(host), 1u);
  EXPECT_TRUE(cow_reads_.empty()) << "nothing to copy: the guest sees zeros around the write";
  EXPECT_EQ(file_bytes(host, 4096), pattern(4096, 0));
  EXPECT_EQ(file_bytes(host + 4096, 4096), pattern(4096, 0xab));
  flush_all();
  EXPECT_EQ(qemu_leaks(), have_qemu_img() ? 0 : -1);
  EXPECT_EQ(qemu_io({"read -P 0 1M 4k", "read -P 0xab 1052672 4k", "read -P 0 1056768 60k"}), "");
}

TEST_F(MappingWriterTest, CopyOnWriteReadsTheGuestViewAroundTheData) {
  make_writer(/*backing_size=*/uint64_t{1} << 30);
  const uint64_t at = kCluster + 8192;
  auto done = write_step(at, pattern(4096, 0xab));
  ASSERT_TRUE(done.ok()) << done.error().message();
  using Read = std::pair<uint64_t, uint64_t>;
  EXPECT_EQ(cow_reads_, (std::vector<Read>{{kCluster, 8192}, {kCluster + 12288, kCluster - 12288}}))
      << "head and tail of the cluster, nothing else";
  const uint64_t host = mapping(at).host_offset - 8192;
  EXPECT_EQ(file_bytes(host, 8192), pattern(8192, 0x5a));
  EXPECT_EQ(file_bytes(host + 8192, 4096), pattern(4096, 0xab));
  EXPECT_EQ(file_bytes(host + 12288, kCluster - 12288), pattern(kCluster - 12288, 0x5a));
}

TEST_F(MappingWriterTest, ACopiedClusterIsOverwrittenInPlace) {
  make_writer(uint64_t{1} << 30);
  ASSERT_TRUE(write_step(0, pattern(kCluster, 1)).ok());
  const uint64_t host = mapping(0).host_offset;
  cow_reads_.clear();
  bool lock_kept = true;
  auto done = write_step(4096, pattern(4096, 2), &lock_kept);
  ASSERT_TRUE(done.ok()) << done.error().message();
  EXPECT_EQ(mapping(0).host_offset, host) << "same host cluster";
  EXPECT_FALSE(lock_kept) << "an in-place write needs no relink: the lock is released for the data write";
  EXPECT_TRUE(cow_reads_.empty());
  EXPECT_EQ(refcount(host), 1u);
  EXPECT_EQ(file_bytes(host, 8192), [] {
    auto v = pattern(8192, 1);
    std::fill(v.begin() + 4096, v.end(), std::byte{2});
    return v;
  }());
}

TEST_F(MappingWriterTest, AnEntryChangedWhileTheWriteWasInFlightIsRefused) {
  make_writer(uint64_t{1} << 30);
  // The COW read runs with the lock released: something that ignored the
  // allocation in flight changes the entry there.
  on_cow_ = [this]() -> Task<void> {
    on_cow_ = nullptr;
    set_l2_entry(3 * kCluster, kOflagZero);
    co_return;
  };
  auto done = write_step(3 * kCluster + 512, pattern(512, 7));
  ASSERT_FALSE(done.ok());
  EXPECT_EQ(done.error().code(), EIO);
  EXPECT_NE(done.error().message().find("changed while a write to it was in flight"), std::string::npos)
      << done.error().message();
  EXPECT_EQ(mapping(3 * kCluster).type, SubclusterType::kZeroPlain) << "the other change is not overwritten";
}

TEST_F(MappingWriterTest, ASharedL2TableIsCopiedBeforeItIsWritten) {
  make_writer();
  ASSERT_TRUE(write_step(0, pattern(kCluster, 9)).ok());
  const uint64_t table = map_->l1().at(0) & kL1OffsetMask;
  const uint64_t data = mapping(0).host_offset;
  // Share the table, as a snapshot does: refcount 2, L1 entry not COPIED.
  ASSERT_TRUE(run(refcounts_->update_refcount(table, kCluster, +1, false)).ok());
  map_->set_active_l1_entry(0, table);
  auto fresh = run([](MappingWriter& w) -> Task<Result<uint64_t>> {
    co_return co_await w.writable_l2_table(0);
  }(*writer_));
  ASSERT_TRUE(fresh.ok()) << fresh.error().message();
  EXPECT_NE(*fresh, table);
  EXPECT_EQ(map_->l1().at(0), *fresh | kOflagCopied);
  EXPECT_EQ(refcount(table), 1u) << "the shared table lost this reference";
  EXPECT_EQ(refcount(*fresh), 1u);
  EXPECT_EQ(mapping(0).host_offset, data) << "the entries were copied";
  flush_all();
  // Nothing but the (here unreferenced) old table is left over: in a real
  // image the snapshot's L1 table still points at it.
  EXPECT_EQ(qemu_leaks(), have_qemu_img() ? 1 : -1);
  EXPECT_EQ(qemu_io({"read -P 9 0 64k"}), "");
}

TEST_F(MappingWriterTest, DamageIsFatalBeforeAnythingIsWritten) {
  make_writer();
  ASSERT_TRUE(write_step(0, pattern(4096, 1)).ok());
  // A COPIED entry whose host offset is not cluster aligned.
  set_l2_entry(2 * kCluster, (8 * kCluster + 512) | kOflagCopied);
  const int marks = marks_;
  auto done = write_step(2 * kCluster, pattern(4096, 2));
  ASSERT_FALSE(done.ok());
  EXPECT_EQ(done.error().code(), EIO);
  EXPECT_EQ(marks_, marks + 1) << "reported fatal: the image is marked corrupt";
  EXPECT_NE(done.error().message().find("L2 entry"), std::string::npos) << done.error().message();
}

TEST_F(MappingWriterTest, ZeroingKeepsOrFreesTheHostClusterAsItsModeSays) {
  make_writer();
  ASSERT_TRUE(write_step(0, pattern(4 * kCluster, 3)).ok());
  uint64_t host[4];
  for (int i = 0; i < 4; ++i) host[i] = mapping(i * kCluster).host_offset;
  using Mode = MappingWriter::ZeroMode;
  ASSERT_TRUE(zero(0, kCluster, Mode::kZero).ok());
  ASSERT_TRUE(zero(kCluster, kCluster, Mode::kZeroMayUnmap).ok());
  ASSERT_TRUE(zero(2 * kCluster, kCluster, Mode::kDiscard).ok());
  ASSERT_TRUE(zero(3 * kCluster, kCluster, Mode::kFullDiscard).ok());
  EXPECT_EQ(mapping(0).type, SubclusterType::kZeroAlloc) << "write -z keeps the host cluster";
  EXPECT_EQ(mapping(kCluster).type, SubclusterType::kZeroPlain);
  EXPECT_EQ(mapping(2 * kCluster).type, SubclusterType::kZeroPlain) << "v3: a discard reads as zeros";
  EXPECT_EQ(mapping(3 * kCluster).type, SubclusterType::kUnallocatedPlain);
  EXPECT_EQ(refcount(host[0]), 1u);
  // The three dropped clusters wait for their grace period and a durable
  // unlink (FreedClusters), then are free.
  EXPECT_EQ(freed_->size(), 3u);
  EXPECT_EQ(refcount(host[1]), 1u) << "not freed while the unlink is not durable";
  flush_all();
  ASSERT_TRUE(run(freed_->make_unlinks_durable()).ok());
  ASSERT_TRUE(run(freed_->release()).ok());
  for (int i = 1; i < 4; ++i) EXPECT_EQ(refcount(host[i]), 0u) << "cluster " << i;
  flush_all();
  EXPECT_EQ(qemu_leaks(), have_qemu_img() ? 0 : -1);
  EXPECT_EQ(qemu_io({"read -P 0 0 256k"}), "");
}

TEST_F(MappingWriterTest, ACompressedClusterIsLinkedOnlyWhereNothingIsAllocated) {
  make_writer();
  std::vector<uint8_t> in(kCluster, 0x33), out(kCluster);
  auto csize = compress_cluster(header_.compression_type, in, out);
  ASSERT_TRUE(csize.ok() && *csize > 0);
  const std::span<const uint8_t> data(out.data(), *csize);
  ASSERT_TRUE(write_compressed(5 * kCluster, data).ok());
  EXPECT_EQ(mapping(5 * kCluster).type, SubclusterType::kCompressed);
  ASSERT_TRUE(write_step(6 * kCluster, pattern(4096, 1)).ok());
  auto again = write_compressed(6 * kCluster, data);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code(), EIO);
  EXPECT_NE(again.error().message().find("allocated cluster"), std::string::npos) << again.error().message();
  EXPECT_FALSE(write_compressed(5 * kCluster, data).ok()) << "nor over a compressed one";
  flush_all();
  EXPECT_EQ(qemu_leaks(), have_qemu_img() ? 0 : -1)
      << "the refused writes gave their bytes back";
  EXPECT_EQ(qemu_io({"read -P 0x33 320k 64k", "read -P 1 384k 4k"}), "");
}

TEST_F(MappingWriterTest, PreallocationLinksReservedClustersAndKeepsWhatIsThere) {
  make_writer();
  using Runs = std::vector<MappingWriter::HostRun>;
  Runs runs;
  ASSERT_TRUE(preallocate(0, 4 * kCluster, true, runs).ok());
  ASSERT_EQ(runs.size(), 1u) << "one allocation for the slice, one run";
  EXPECT_EQ(runs[0].length, 4 * kCluster);
  for (uint64_t i = 0; i < 4; ++i) {
    const Mapping m = mapping(i * kCluster);
    EXPECT_TRUE(m.copied);
    EXPECT_EQ(m.host_offset, runs[0].host + i * kCluster);
    EXPECT_EQ(refcount(m.host_offset), 1u);
  }
  Runs again;
  auto refused = preallocate(0, 4 * kCluster, true, again);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), EEXIST);
  // Not fresh (a resize's added area): what is mapped keeps its cluster.
  Runs grown;
  ASSERT_TRUE(preallocate(3 * kCluster, 6 * kCluster, false, grown).ok());
  ASSERT_EQ(grown.size(), 1u);
  EXPECT_EQ(grown[0].length, 2 * kCluster) << "clusters 4 and 5 only";
  EXPECT_EQ(mapping(3 * kCluster).host_offset, runs[0].host + 3 * kCluster);
  flush_all();
  EXPECT_EQ(qemu_leaks(), have_qemu_img() ? 0 : -1);
  EXPECT_EQ(qemu_io({"read -P 0 0 384k"}), "") << "preallocated clusters read as zeros";
}

}  // namespace
}  // namespace uqcow::qcow2

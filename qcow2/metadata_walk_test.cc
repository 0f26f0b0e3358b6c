// Unit tests of collect_metadata_regions alone, over an image qemu-img made
// (64 MiB, 64 KiB clusters), qemu-io wrote two data clusters into, and
// `qemu-img snapshot -c` gave an internal snapshot: every metadata
// structure is found, under its own kind (the active L2 table, shared with
// the snapshot, under both L2 kinds); no data cluster that `qemu-img map`
// reports is taken for metadata; only the tracked kinds are collected; a
// snapshot L1 table that cannot be read is named.
#include "qcow2/metadata_walk.h"

#include <gtest/gtest.h>

#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "qcow2/component_fixture.h"
#include "qcow2/snapshot_table.h"
#include "qcow2/tables.h"
#include "uring/layered_device.h"
#include "uring/raw_file.h"

namespace uqcow::qcow2 {
namespace {

class MetadataWalkTest : public ComponentFixture {
 protected:
  void make_image() override {
    if (!testing::require_tool("qemu-img") || !testing::require_tool("qemu-io")) return;
    ASSERT_TRUE(testing::Succeeded(testing::run_command({"qemu-img", "create", "-f", "qcow2", path_, "64M"})));
    ASSERT_TRUE(testing::Succeeded(
        testing::run_command({"qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k", path_})));
    ASSERT_TRUE(testing::Succeeded(testing::run_command({"qemu-img", "snapshot", "-c", "s1", path_})));
  }
  void SetUp() override {
    ComponentFixture::SetUp();
    if (HasFatalFailure() || IsSkipped()) return;
    snapshots_.emplace(*file_, header_, geo_, *map_, *refcounts_, *overlap_);
    ASSERT_TRUE(run(snapshots_->load()).ok());
    ASSERT_EQ(snapshots_->list().size(), 1u);
  }
  void TearDown() override {
    snapshots_.reset();
    ComponentFixture::TearDown();
  }
  // The image's file, failing every read that covers host offset `at`.
  class FailingReads final : public LayeredBlockDevice {
   public:
    FailingReads(const std::string& path, uint64_t at) : LayeredBlockDevice(open(path)), at_(at) {}
    Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override {
      if (offset <= at_ && at_ < offset + buf.size()) co_return Error(EIO, "injected read error");
      co_return co_await LayeredBlockDevice::co_read(offset, buf);
    }

   private:
    static std::unique_ptr<BlockDevice> open(const std::string& path) {
      auto f = RawFile::open(path, RawFileOptions{});
      EXPECT_TRUE(f.ok());
      return f.ok() ? std::move(f).value() : nullptr;
    }
    uint64_t at_;
  };
  Result<MetadataRegions> walk(OverlapMask tracked, BlockDevice* file = nullptr) {
    return run(collect_metadata_regions(file ? *file : *file_,
                                        ImageTables{.header = header_,
                                                    .geo = geo_,
                                                    .active_l1 = map_->l1(),
                                                    .refcount_table = refcounts_->table(),
                                                    .snapshots = snapshots_->list(),
                                                    .snapshot_table_bytes = snapshots_->clusters_bytes()},
                                        tracked));
  }
  // The kind of metadata at host `offset`, if any.
  static std::optional<MetadataKind> at(const MetadataRegions& r, uint64_t offset, OverlapMask mask = kOverlapAll) {
    return r.overlaps(offset, 1, mask);
  }

  std::optional<SnapshotTable> snapshots_;
};

TEST_F(MetadataWalkTest, EveryStructureIsFoundUnderItsKind) {
  auto r = walk(kOverlapAll);
  ASSERT_TRUE(r.ok()) << r.error().message();
  using K = MetadataKind;
  const uint64_t l2 = map_->l1().at(0) & kL1OffsetMask;
  ASSERT_NE(l2, 0u);
  const Snapshot& sn = snapshots_->list()[0];
  EXPECT_EQ(at(*r, 0), K::kMainHeader);
  EXPECT_EQ(at(*r, header_.l1_table_offset), K::kActiveL1);
  EXPECT_EQ(at(*r, header_.refcount_table_offset), K::kRefcountTable);
  EXPECT_EQ(at(*r, refcounts_->table().at(0) & kReftableOffsetMask), K::kRefcountBlock);
  EXPECT_EQ(at(*r, header_.snapshots_offset), K::kSnapshotTable);
  EXPECT_EQ(at(*r, sn.l1_table_offset), K::kInactiveL1);
  EXPECT_EQ(at(*r, l2, overlap_bit(K::kActiveL2)), K::kActiveL2);
  EXPECT_EQ(at(*r, l2, overlap_bit(K::kInactiveL2)), K::kInactiveL2) << "the snapshot shares the L2 table";
  EXPECT_EQ(at(*r, l2 + kCluster - 1, overlap_bit(K::kActiveL2)), K::kActiveL2) << "whole clusters";
}

TEST_F(MetadataWalkTest, NoDataClusterIsTakenForMetadata) {
  auto r = walk(kOverlapAll);
  ASSERT_TRUE(r.ok()) << r.error().message();
  // qemu-img map's extents with data: "offset": host offset, "length".
  const testing::CommandResult mapped = testing::run_command({"qemu-img", "map", "-U", "--output=json", path_});
  ASSERT_TRUE(testing::Succeeded(mapped));
  const std::string& map = mapped.out;
  const std::regex extent(R"re("length": (\d+), "depth": \d+, "present": true, "zero": false, "data": true, "offset": (\d+))re");
  int extents = 0;
  for (std::sregex_iterator it(map.begin(), map.end(), extent), end; it != end; ++it, ++extents) {
    const uint64_t length = std::stoull((*it)[1]), offset = std::stoull((*it)[2]);
    EXPECT_EQ(r->overlaps(offset, length, kOverlapAll), std::nullopt) << "data at " << offset << " (" << length << ")";
  }
  EXPECT_EQ(extents, 2) << map;
}

TEST_F(MetadataWalkTest, OnlyTheTrackedKindsAreCollected) {
  auto r = walk(kOverlapCached);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const uint64_t l2 = map_->l1().at(0) & kL1OffsetMask;
  EXPECT_EQ(at(*r, l2, overlap_bit(MetadataKind::kInactiveL2)), std::nullopt);
  EXPECT_EQ(r->tracked(), kOverlapCached);
  // Without inactive L2 tables, snapshot L1 tables are not even read.
  FailingReads file(path_, snapshots_->list()[0].l1_table_offset);
  EXPECT_TRUE(walk(kOverlapCached, &file).ok());
}

TEST_F(MetadataWalkTest, AnUnreadableSnapshotL1TableIsNamed) {
  FailingReads file(path_, snapshots_->list()[0].l1_table_offset);
  auto r = walk(kOverlapAll, &file);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), EIO);
  EXPECT_NE(r.error().message().find("L1 table of snapshot " + snapshots_->list()[0].id), std::string::npos)
      << r.error().message();
}

}  // namespace
}  // namespace uqcow::qcow2

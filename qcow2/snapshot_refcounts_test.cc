// Unit tests of SnapshotRefcounts alone (component_fixture.h), over an image
// qemu-img made and qemu-io wrote three data clusters into: the walk over
// one L1 table raises and drops the counts of its L2 table and data
// clusters, recomputes OFLAG_COPIED, and refuses damage before changing
// anything. `qemu-img check` is the oracle for the result on disk.
#include "qcow2/snapshot_refcounts.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "qcow2/component_fixture.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {
namespace {

class SnapshotRefcountsTest : public ComponentFixture {
 protected:
  void make_image() override {
    if (!testing::require_tool("qemu-img") || !testing::require_tool("qemu-io")) return;
    ASSERT_TRUE(testing::Succeeded(testing::run_command({"qemu-img", "create", "-f", "qcow2", path_, "64M"})));
    ASSERT_TRUE(testing::Succeeded(
        testing::run_command({"qemu-io", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", path_})));
  }
  void SetUp() override {
    ComponentFixture::SetUp();
    if (HasFatalFailure() || IsSkipped()) return;
    walk_.emplace(geo_, *file_, false, *map_, *refcounts_, *reporter_);
    l1_ = map_->l1();
    ASSERT_NE(l1_.at(0) & kL1OffsetMask, 0u);
    l2_table_ = l1_[0] & kL1OffsetMask;
    auto slice = run(map_->l2_cache().get(l2_table_));
    ASSERT_TRUE(slice.ok());
    const ConstL2Slice entries(slice->data(), geo_);
    for (uint64_t i : {0, 1, 16}) data_.push_back(entries.entry(i) & kL2OffsetMask);
    for (uint64_t d : data_) ASSERT_NE(d, 0u);
  }
  bool copied(uint64_t index) {
    auto slice = run(map_->l2_cache().get(l2_table_));
    EXPECT_TRUE(slice.ok());
    return slice.ok() && (ConstL2Slice(slice->data(), geo_).entry(index) & kOflagCopied);
  }
  // Writes back both caches and `l1` as the active L1 table, and syncs.
  void write_back(const std::vector<uint64_t>& l1) {
    ASSERT_TRUE(run(refcounts_->cache().flush()).ok());
    ASSERT_TRUE(run(map_->l2_cache().flush()).ok());
    const std::vector<uint8_t> raw = encode_table(l1);
    ASSERT_TRUE(run(file_->co_write(header_.l1_table_offset, std::as_bytes(std::span(raw)))).ok());
    ASSERT_TRUE(run(file_->co_flush()).ok());
  }
  int qemu_check() { return testing::run_command({"qemu-img", "check", "-U", path_}).exit_code; }

  std::optional<SnapshotRefcounts> walk_;
  std::vector<uint64_t> l1_;
  uint64_t l2_table_ = 0;
  std::vector<uint64_t> data_;
};

TEST_F(SnapshotRefcountsTest, RaiseDropAndRecomputeLeaveTheImageAsItWas) {
  ASSERT_EQ(qemu_check(), 0) << "qemu-io's image";
  bool changed = false;
  ASSERT_TRUE(run(walk_->update(l1_, +1, false, changed)).ok());
  EXPECT_TRUE(changed);
  EXPECT_EQ(l1_[0] & kOflagCopied, 0u) << "a shared L2 table loses COPIED";
  EXPECT_EQ(refcount(l2_table_), 2u);
  for (uint64_t d : data_) EXPECT_EQ(refcount(d), 2u);
  EXPECT_FALSE(copied(0));
  EXPECT_FALSE(copied(16));
  write_back(l1_);
  EXPECT_EQ(qemu_check(), 3) << "counted twice, referenced once: leaks, no errors";

  changed = false;
  ASSERT_TRUE(run(walk_->update(l1_, -1, false, changed)).ok());
  EXPECT_FALSE(changed) << "dropping never sets COPIED";
  EXPECT_EQ(refcount(l2_table_), 1u);
  for (uint64_t d : data_) EXPECT_EQ(refcount(d), 1u);
  EXPECT_FALSE(copied(0)) << "not before the lowered count is on disk";
  ASSERT_TRUE(run(refcounts_->cache().flush()).ok());
  ASSERT_TRUE(run(walk_->recompute_copied_flags(l1_, changed)).ok());
  EXPECT_TRUE(changed);
  EXPECT_NE(l1_[0] & kOflagCopied, 0u);
  EXPECT_TRUE(copied(0));
  EXPECT_TRUE(copied(16));
  write_back(l1_);
  EXPECT_EQ(qemu_check(), 0) << "back to a clean image";
  EXPECT_EQ(marks_, 0);
}

TEST_F(SnapshotRefcountsTest, ATableBeyondTheFileIsRefusedBeforeAnythingChanges) {
  std::vector<uint64_t> l1 = l1_;
  l1.push_back(uint64_t{1} << 40);  // an L2 table 1 TiB into a small file
  Status s = run(walk_->check_in_file(l1));
  EXPECT_EQ(s.code(), EIO);
  EXPECT_NE(s.message().find("beyond the end of the image file"), std::string::npos) << s.message();
  EXPECT_TRUE(run(walk_->check_in_file(l1_)).ok()) << "the image's own table is fine";
  EXPECT_EQ(refcount(l2_table_), 1u);
  EXPECT_EQ(marks_, 0) << "refused, not marked corrupt";
}

TEST_F(SnapshotRefcountsTest, AnUnalignedL2TableIsFatalCorruption) {
  std::vector<uint64_t> l1 = l1_;
  l1[0] = l2_table_ + 512;
  Status s = run(walk_->check_in_file(l1));
  EXPECT_EQ(s.code(), EIO);
  EXPECT_NE(s.message().find("unaligned"), std::string::npos) << s.message();
  EXPECT_EQ(marks_, 1) << "a read-write image is marked corrupt";
  bool changed = false;
  EXPECT_EQ(run(walk_->update(l1, +1, false, changed)).code(), EIO);
  EXPECT_EQ(refcount(l2_table_), 1u);
}

}  // namespace
}  // namespace uqcow::qcow2

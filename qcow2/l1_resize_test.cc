// Unit tests of L1Resize alone, on a fresh 1 GiB image (component_fixture.h:
// 64 KiB clusters, an L1 table of 2 entries) given one or two L2 tables by
// hand: growing writes a new table holding the old entries, points the
// header at it and frees the old one; growing past 32 MiB of L1 is refused
// with nothing changed; shrinking clears the entries on disk and frees their
// L2 tables. `qemu-img check` is the oracle for the image on disk.
#include "qcow2/l1_resize.h"

#include <gtest/gtest.h>

#include <vector>

#include "qcow2/component_fixture.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {
namespace {

class L1ResizeTest : public ComponentFixture {
 protected:
  void SetUp() override {
    ComponentFixture::SetUp();
    if (HasFatalFailure()) return;
    resize_.emplace(*file_, header_, geo_, *map_, *refcounts_, *overlap_, *reporter_);
    ASSERT_EQ(map_->l1().size(), 2u);
  }
  void TearDown() override {
    resize_.reset();
    ComponentFixture::TearDown();
  }
  // A new, empty L2 table linked at L1 index `index` (on disk).
  uint64_t link_l2_table(uint64_t index) {
    auto table = run(refcounts_->alloc_clusters(1));
    EXPECT_TRUE(table.ok());
    if (!table.ok()) return 0;
    std::vector<std::byte> zeros(kCluster);
    EXPECT_TRUE(run(file_->co_write(*table, zeros)).ok());
    map_->set_active_l1_entry(index, *table | kOflagCopied);
    EXPECT_TRUE(run(map_->write_l1_entry(index)).ok());
    return *table;
  }
  // The L1 table as the header on disk describes it.
  std::vector<uint64_t> l1_on_disk(Header* h = nullptr) {
    auto header = run(read_image_header(*file_, HeaderUse::kOpen));
    EXPECT_TRUE(header.ok());
    if (!header.ok()) return {};
    if (h) *h = *header;
    auto table = run(read_table(*file_, header->l1_table_offset, header->l1_size));
    EXPECT_TRUE(table.ok());
    return table.ok() ? *table : std::vector<uint64_t>{};
  }

  std::optional<L1Resize> resize_;
};

TEST_F(L1ResizeTest, GrowingMovesTheEntriesToANewTableAndFreesTheOldOne) {
  const uint64_t l2 = link_l2_table(1);
  const uint64_t old_table = header_.l1_table_offset;
  ASSERT_TRUE(run(resize_->grow_for(uint64_t{1} << 40, false)).ok());  // 1 TiB: 2048 entries
  EXPECT_EQ(map_->l1().size(), 8192u) << "whole clusters of entries";
  EXPECT_NE(header_.l1_table_offset, old_table);
  EXPECT_EQ(header_.l1_size, 8192u);
  Header on_disk;
  const std::vector<uint64_t> table = l1_on_disk(&on_disk);
  EXPECT_EQ(on_disk.l1_table_offset, header_.l1_table_offset) << "the header points at the new table";
  EXPECT_EQ(on_disk.l1_size, 8192u);
  ASSERT_EQ(table.size(), 8192u);
  EXPECT_EQ(table[0], 0u);
  EXPECT_EQ(table[1], l2 | kOflagCopied) << "the old entries carried over";
  EXPECT_EQ(map_->l1()[1], l2 | kOflagCopied);
  EXPECT_EQ(refcount(old_table), 0u) << "the old table is freed";
  EXPECT_EQ(refcount(header_.l1_table_offset), 1u);
  flush();
  EXPECT_EQ(qemu_leaks(), have_qemu_img() ? 0 : -1);
}

TEST_F(L1ResizeTest, GrowingPastThirtyTwoMiBOfL1IsRefusedWithNothingChanged) {
  const uint64_t old_table = header_.l1_table_offset;
  // 64 KiB clusters: one L1 entry maps 512 MiB; 32 MiB of entries map 2 PiB.
  auto grown = run(resize_->grow_for(uint64_t{4} << 50, false));
  ASSERT_FALSE(grown.ok());
  EXPECT_EQ(grown.error().code(), EFBIG);
  EXPECT_EQ(header_.l1_table_offset, old_table);
  EXPECT_EQ(map_->l1().size(), 2u);
  EXPECT_EQ(l1_on_disk().size(), 2u);
}

TEST_F(L1ResizeTest, GrowingIsNothingWhenTheTableIsLargeEnough) {
  const uint64_t old_table = header_.l1_table_offset;
  ASSERT_TRUE(run(resize_->grow_for(uint64_t{1} << 30, false)).ok());
  EXPECT_EQ(header_.l1_table_offset, old_table);
  EXPECT_EQ(map_->l1().size(), 2u);
}

TEST_F(L1ResizeTest, ShrinkingClearsTheEntriesOnDiskThenFreesTheirTables) {
  const uint64_t kept = link_l2_table(0), dropped = link_l2_table(1);
  ASSERT_TRUE(run(resize_->shrink_to(1)).ok());
  EXPECT_EQ(map_->l1()[0], kept | kOflagCopied);
  EXPECT_EQ(map_->l1()[1], 0u);
  const std::vector<uint64_t> table = l1_on_disk();
  ASSERT_EQ(table.size(), 2u) << "the table keeps its size";
  EXPECT_EQ(table[0], kept | kOflagCopied);
  EXPECT_EQ(table[1], 0u);
  EXPECT_EQ(refcount(kept), 1u);
  EXPECT_EQ(refcount(dropped), 0u);
  flush();
  EXPECT_EQ(qemu_leaks(), have_qemu_img() ? 0 : -1);
}

}  // namespace
}  // namespace uqcow::qcow2

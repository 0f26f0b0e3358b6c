// Unit tests of the Refcounts component alone, over a fresh image
// (component_fixture.h): every cluster allocated here shows up in
// `qemu-img check` as a leak, and every one given back disappears from it.
#include "qcow2/refcounts.h"

#include <gtest/gtest.h>

#include "qcow2/header_io.h"
#include "qcow2/component_fixture.h"

namespace uqcow::qcow2 {
namespace {

class RefcountsTest : public ComponentFixture {
 protected:
  RefcountsTest() : ComponentFixture(2) {}  // small counts: overflow is reachable
};

TEST_F(RefcountsTest, AllocatedClustersAreCountedOnDiskAndGivenBack) {
  auto a = run(refcounts_->alloc_clusters(3));
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(*a % kCluster, 0u);
  EXPECT_GE(*a, 3 * kCluster) << "past the header, refcount table and block, L1 table";
  for (uint64_t i = 0; i < 3; ++i) {
    auto rc = run(refcounts_->get_refcount((*a >> 16) + i));
    ASSERT_TRUE(rc.ok());
    EXPECT_EQ(*rc, 1u);
  }
  auto b = run(refcounts_->alloc_clusters(1));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, *a + 3 * kCluster) << "the next free cluster";
  // qemu-img check looks at clusters inside the file only: give the new
  // clusters their bytes, as the writes that would fill them do.
  ASSERT_TRUE(file_->truncate(*b + kCluster).ok());
  flush();
  long long leaks = qemu_leaks();
  if (leaks == -1) GTEST_SKIP() << "qemu-img not installed";
  EXPECT_EQ(leaks, 4) << "referenced by nothing but counted";
  ASSERT_TRUE(run(refcounts_->update_refcount(*a, 3 * kCluster, -1, false)).ok());
  ASSERT_TRUE(run(refcounts_->update_refcount(*b, kCluster, -1, false)).ok());
  flush();
  EXPECT_EQ(qemu_leaks(), 0);
  // The freed clusters are found again first.
  auto again = run(refcounts_->alloc_clusters(1));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *a);
}

TEST_F(RefcountsTest, CompressedBytesShareAClusterUntilItIsFull) {
  auto x = run(refcounts_->alloc_bytes(1000));
  auto y = run(refcounts_->alloc_bytes(1000));
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_EQ(*y, *x + 1000) << "packed after the first";
  auto rc = run(refcounts_->get_refcount(*x >> 16));
  ASSERT_TRUE(rc.ok());
  EXPECT_EQ(*rc, 2u) << "one reference per allocation in the cluster";
  // With 2-bit refcounts the cluster is full at 3: the next goes elsewhere.
  auto z = run(refcounts_->alloc_bytes(1000));
  auto w = run(refcounts_->alloc_bytes(1000));
  ASSERT_TRUE(z.ok() && w.ok());
  EXPECT_EQ(*z >> 16, *x >> 16);
  EXPECT_NE(*w >> 16, *x >> 16) << "refcount 3 is the 2-bit maximum";
}

TEST_F(RefcountsTest, UnderflowAndOverflowAreCorruptionNotWraparound) {
  auto a = run(refcounts_->alloc_clusters(1));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(run(refcounts_->update_refcount(*a, kCluster, -1, false)).ok());
  Status under = run(refcounts_->update_refcount(*a, kCluster, -1, false));
  EXPECT_EQ(under.code(), EIO);
  EXPECT_NE(under.message().find("would underflow"), std::string::npos) << under.message();
  auto b = run(refcounts_->alloc_clusters(1));
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(run(refcounts_->update_refcount(*b, kCluster, +2, false)).ok());  // now 3
  Status over = run(refcounts_->update_refcount(*b, kCluster, +1, false));
  EXPECT_EQ(over.code(), EIO);
  EXPECT_NE(over.message().find("would overflow"), std::string::npos) << over.message();
  auto rc = run(refcounts_->get_refcount(*b >> 16));
  ASSERT_TRUE(rc.ok());
  EXPECT_EQ(*rc, 3u) << "unchanged by the refused update";
  // Freeing a cluster no refcount block covers: never grows the structure.
  Status far = run(refcounts_->update_refcount(1ull << 50, kCluster, -1, false));
  EXPECT_EQ(far.code(), EIO);
  EXPECT_EQ(refcounts_->table().size(), header_.refcount_table_clusters * kCluster / 8);
}

TEST_F(RefcountsTest, TableGrowthMovesTheTableAndTheHeaderFollows) {
  // 2-bit refcounts: one block covers 64 Ki clusters (4 GiB). Counting a
  // cluster past the table's reach grows it.
  const uint64_t entries = refcounts_->table().size();
  const uint64_t far = entries * (kCluster * 8 / 2) * kCluster;  // first cluster the table cannot reach
  ASSERT_TRUE(run(refcounts_->update_refcount(far, kCluster, +1, false)).ok());
  EXPECT_GT(refcounts_->table().size(), entries);
  auto on_disk = run(read_image_header(*file_, HeaderUse::kOpen));
  ASSERT_TRUE(on_disk.ok());
  EXPECT_EQ(on_disk->refcount_table_offset, header_.refcount_table_offset);
  EXPECT_EQ(on_disk->refcount_table_clusters, header_.refcount_table_clusters);
  EXPECT_NE(header_.refcount_table_offset, kCluster) << "the table moved";
  EXPECT_EQ(marks_, 0);
}

}  // namespace
}  // namespace uqcow::qcow2

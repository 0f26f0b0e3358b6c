// Unit tests of FreedClusters alone, over Refcounts on a fresh image
// (component_fixture.h): an unlinked cluster keeps its refcount until every
// request that started before the unlink has finished AND the unlink is
// durable; the space waiting only for durability is bounded; an external
// data file's clusters are never counted.
#include "qcow2/freed_clusters.h"

#include <gtest/gtest.h>

#include <memory>
#include <optional>

#include "engine/in_flight.h"
#include "qcow2/component_fixture.h"

namespace uqcow::qcow2 {
namespace {

class FreedClustersTest : public ComponentFixture {
 protected:
  void SetUp() override {
    ComponentFixture::SetUp();
    if (HasFatalFailure()) return;
    freed_.emplace(geo_, *file_, *file_, requests_, *refcounts_, *l2_cache_, *reporter_);
  }
  void TearDown() override {
    freed_.reset();
    ComponentFixture::TearDown();
  }
  uint64_t alloc() {
    auto a = run(refcounts_->alloc_clusters(1));
    EXPECT_TRUE(a.ok()) << a.error().message();
    return a.ok() ? *a : 0;
  }
  void release() { ASSERT_TRUE(run(freed_->release()).ok()); }

  InFlightTracker requests_;
  std::optional<FreedClusters> freed_;
};

TEST_F(FreedClustersTest, FreedOnlyAfterTheGracePeriodAndADurableUnlink) {
  const uint64_t host = alloc();
  auto before = std::make_unique<InFlightTracker::Ticket>(requests_);  // may have mapped `host`
  ASSERT_TRUE(run(freed_->defer(host | kOflagCopied, false)).ok());
  InFlightTracker::Ticket after(requests_);  // started after the unlink: cannot see `host`
  release();
  EXPECT_EQ(refcount(host), 1u) << "a request older than the unlink is in flight";
  before.reset();
  release();
  EXPECT_EQ(refcount(host), 1u) << "the unlink is not durable yet";
  EXPECT_EQ(freed_->size(), 1u);
  ASSERT_TRUE(run(freed_->make_unlinks_durable()).ok());
  release();
  EXPECT_EQ(refcount(host), 0u) << "grace period over, unlink durable: freed";
  EXPECT_TRUE(freed_->empty());
  EXPECT_EQ(alloc(), host) << "and reused";
}

TEST_F(FreedClustersTest, AGuestFlushMakesTheQueuedUnlinksDurable) {
  const uint64_t a = alloc(), b = alloc();
  ASSERT_TRUE(run(freed_->defer(a, false)).ok());
  freed_->unlinks_are_durable();  // a flush wrote the L2 tables and synced
  ASSERT_TRUE(run(freed_->defer(b, false)).ok());
  release();
  EXPECT_EQ(refcount(a), 0u);
  EXPECT_EQ(refcount(b), 1u) << "unlinked after the flush: not durable";
  EXPECT_EQ(freed_->size(), 1u);
}

TEST_F(FreedClustersTest, TooMuchWaitingForDurabilityIsMadeDurableByRelease) {
  // 64 KiB clusters: 32 MiB may wait for a flush, 512 clusters.
  constexpr uint64_t kBound = (32ull << 20) / kCluster;
  auto first = run(refcounts_->alloc_clusters(kBound));
  ASSERT_TRUE(first.ok()) << first.error().message();
  for (uint64_t i = 0; i + 1 < kBound; ++i) ASSERT_TRUE(run(freed_->defer(*first + i * kCluster, false)).ok());
  release();
  EXPECT_EQ(freed_->size(), kBound - 1) << "under the bound: waits for the guest's flush";
  EXPECT_EQ(refcount(*first), 1u);
  ASSERT_TRUE(run(freed_->defer(*first + (kBound - 1) * kCluster, false)).ok());
  release();
  EXPECT_TRUE(freed_->empty()) << "at the bound: made durable and freed";
  for (uint64_t i = 0; i < kBound; ++i) ASSERT_EQ(refcount(*first + i * kCluster), 0u) << i;
}

TEST_F(FreedClustersTest, ACompressedEntryDropsOneReferenceToItsBytes) {
  auto x = run(refcounts_->alloc_bytes(1000));
  auto y = run(refcounts_->alloc_bytes(1000));
  ASSERT_TRUE(x.ok() && y.ok());
  ASSERT_EQ(refcount(*x), 2u);
  // One 512-byte sector's descriptor (sector count field 0 means 1 sector)
  // would not cover 1000 bytes: 2 sectors.
  const uint64_t entry = kOflagCompressed | (uint64_t{1} << geo_.csize_shift) | *x;
  ASSERT_TRUE(run(freed_->defer(entry, false)).ok());
  ASSERT_TRUE(run(freed_->make_unlinks_durable()).ok());
  release();
  EXPECT_EQ(refcount(*x), 1u) << "the cluster still holds the second compressed run";
}

TEST_F(FreedClustersTest, AnUnalignedHostOffsetIsLeakedNotFreedAndNotFatal) {
  const uint64_t host = alloc();
  ASSERT_TRUE(run(freed_->defer((host + 512) | kOflagCopied, false)).ok());
  ASSERT_TRUE(run(freed_->make_unlinks_durable()).ok());
  release();
  EXPECT_EQ(refcount(host), 1u);
  EXPECT_TRUE(freed_->empty());
  EXPECT_EQ(marks_, 0) << "QEMU does not mark the image corrupt for this";
}

TEST_F(FreedClustersTest, AnExternalDataFileClusterIsNeverCounted) {
  const uint64_t host = alloc();  // a qcow2-file cluster at the same offset
  std::optional<FreedClusters> external;
  // Any other device stands for the data file; the queue must stay empty
  // and the qcow2 file's refcounts untouched.
  auto other = RawFile::open(path_, RawFileOptions{.read_only = true, .lock = {}});
  ASSERT_TRUE(other.ok()) << other.error().message();
  external.emplace(geo_, *file_, **other, requests_, *refcounts_, *l2_cache_, *reporter_);
  ASSERT_TRUE(run(external->defer(host | kOflagCopied, false)).ok());
  EXPECT_TRUE(external->empty());
  ASSERT_TRUE(run(external->make_unlinks_durable()).ok());
  ASSERT_TRUE(run(external->release()).ok());
  EXPECT_EQ(refcount(host), 1u);
}

}  // namespace
}  // namespace uqcow::qcow2

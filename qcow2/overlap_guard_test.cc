// Unit tests of the overlap guard and the corruption reporter alone: which
// writes are refused, what the refusal says, and that the image is marked
// once.
#include "qcow2/overlap_guard.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qcow2/format.h"

namespace uqcow::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;

struct Fixture {
  int marks = 0;
  CorruptionReporter reporter{"img.qcow2", /*read_only=*/false, [this] { ++marks; }};
  OverlapGuard guard{reporter, kCluster, /*checks_data=*/true};

  Fixture() {
    MetadataRegions r;
    r.reset(kOverlapAll);
    r.add(MetadataKind::kMainHeader, 0, kCluster);
    r.add(MetadataKind::kActiveL1, 3 * kCluster, kCluster);
    r.add(MetadataKind::kRefcountTable, kCluster, kCluster);
    r.add(MetadataKind::kRefcountBlock, 2 * kCluster, kCluster);
    guard.reset(std::move(r), kOverlapAll);
  }
};

TEST(OverlapGuard, DataWriteOnMetadataIsRefusedAndMarksTheImageOnce) {
  Fixture f;
  EXPECT_TRUE(f.guard.check_data_write(4 * kCluster, 4096).ok());
  Status s = f.guard.check_data_write(3 * kCluster + 512, 512);
  ASSERT_EQ(s.code(), EIO);
  EXPECT_NE(s.message().find("overlaps with active L1 table"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("img.qcow2 is corrupt"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("the image is marked corrupt"), std::string::npos) << s.message();
  EXPECT_EQ(f.marks, 1);
  EXPECT_TRUE(f.reporter.marked_corrupt());
  // A second refusal reports, but marks nothing again.
  Status again = f.guard.check_data_write(0, 1);
  EXPECT_EQ(again.code(), EIO);
  EXPECT_NE(again.message().find("qcow2_header"), std::string::npos) << again.message();
  EXPECT_NE(again.message().find("(the image is marked corrupt)"), std::string::npos) << again.message();
  EXPECT_EQ(f.marks, 1);
}

TEST(OverlapGuard, AStructureMayBeWrittenOverItsOwnKind) {
  Fixture f;
  EXPECT_TRUE(f.guard.check_metadata_write(2 * kCluster, kCluster, "refcount block",
                                           overlap_bit(MetadataKind::kRefcountBlock)).ok());
  EXPECT_EQ(f.guard.refcount_cache_check().check_metadata_write(2 * kCluster, kCluster, "x").code(), 0);
  EXPECT_EQ(f.guard.l2_cache_check().check_metadata_write(2 * kCluster, kCluster, "x").code(), EIO);
  EXPECT_EQ(f.marks, 1);
}

TEST(OverlapGuard, ActiveL2FollowsTheL1EntryAndSharedRewritesAreAllowedOnlyInScope) {
  Fixture f;
  const uint64_t l2 = 8 * kCluster, snap_l2 = 9 * kCluster;
  f.guard.active_l1_entry_changed(0, l2 | kOflagCopied);
  f.guard.l2_tables(MetadataKind::kInactiveL2, {snap_l2}, true);
  EXPECT_EQ(f.guard.find_overlap(l2, 8, kOverlapAll), MetadataKind::kActiveL2);
  EXPECT_TRUE(f.guard.l2_cache_check().check_metadata_write(l2, 4096, "L2").ok());
  {
    OverlapGuard::SharedL2Rewrite rewrite(f.guard);
    EXPECT_TRUE(f.guard.l2_cache_check().check_metadata_write(snap_l2, 4096, "L2").ok());
  }
  EXPECT_EQ(f.guard.l2_cache_check().check_metadata_write(snap_l2, 4096, "L2").code(), EIO);
  // The entry moves: the old table is no longer protected as active L2.
  f.guard.active_l1_entry_changed(l2 | kOflagCopied, 0);
  EXPECT_FALSE(f.guard.find_overlap(l2, 8, kOverlapAll).has_value());
}

TEST(OverlapGuard, NothingIsCheckedAtLevelNoneOrWithAnExternalDataFile) {
  int marks = 0;
  CorruptionReporter reporter("img.qcow2", false, [&] { ++marks; });
  OverlapGuard external(reporter, kCluster, /*checks_data=*/false);
  MetadataRegions r;
  r.reset(kOverlapCached);
  r.add(MetadataKind::kMainHeader, 0, kCluster);
  external.reset(r, kOverlapCached);
  EXPECT_TRUE(external.check_data_write(0, 512).ok()) << "data goes to the data file";
  EXPECT_EQ(external.check_metadata_write(0, 512, "L2 table").code(), EIO);
  OverlapGuard none(reporter, kCluster, true);
  none.reset(r, 0);
  EXPECT_TRUE(none.check_metadata_write(0, 512, "L2 table").ok());
  EXPECT_TRUE(none.check_data_write(0, 512).ok());
}

TEST(CorruptionReporter, ReadOnlyImagesAreOnlyReported) {
  int marks = 0;
  CorruptionReporter ro("ro.qcow2", /*read_only=*/true, [&] { ++marks; });
  Error e = ro.fatal(ro.corruption("L2 entry bad"));
  EXPECT_EQ(e.code(), EIO);
  EXPECT_EQ(e.message(), "qcow2 image ro.qcow2 is corrupt: L2 entry bad");
  EXPECT_EQ(marks, 0);
  EXPECT_FALSE(ro.marked_corrupt());
}

}  // namespace
}  // namespace uqcow::qcow2

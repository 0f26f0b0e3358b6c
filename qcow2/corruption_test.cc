// Unit tests of CorruptionReporter: a fatal report marks a read-write image
// once (and says so in the error), a read-only image is only reported,
// corruption() alone marks nothing, and a non-fatal report never marks.
#include "qcow2/corruption.h"

#include <gtest/gtest.h>

#include <string>

namespace uqcow::qcow2 {
namespace {

TEST(CorruptionReporter, AFatalReportMarksAReadWriteImageOnce) {
  int marks = 0;
  CorruptionReporter r("a.qcow2", /*read_only=*/false, [&] { ++marks; });
  Error first = r.fatal(r.corruption("L2 table offset 0x1200 unaligned"));
  EXPECT_EQ(first.code(), EIO);
  EXPECT_NE(first.message().find("a.qcow2"), std::string::npos) << first.message();
  EXPECT_NE(first.message().find("L2 table offset 0x1200 unaligned"), std::string::npos);
  EXPECT_NE(first.message().find("marked corrupt"), std::string::npos);
  EXPECT_TRUE(r.marked_corrupt());
  Error second = r.fatal(r.corruption("another"));
  EXPECT_EQ(marks, 1) << "the corrupt bit is written once";
  EXPECT_NE(second.message().find("marked corrupt"), std::string::npos);
}

TEST(CorruptionReporter, AReadOnlyImageIsOnlyReported) {
  int marks = 0;
  CorruptionReporter r("a.qcow2", /*read_only=*/true, [&] { ++marks; });
  Error e = r.fatal(r.corruption("refcount block offset beyond the end"));
  EXPECT_EQ(e.code(), EIO);
  EXPECT_EQ(marks, 0);
  EXPECT_FALSE(r.marked_corrupt());
}

TEST(CorruptionReporter, DescribingOrANonFatalReportMarksNothing) {
  int marks = 0;
  CorruptionReporter r("a.qcow2", false, [&] { ++marks; });
  (void)r.corruption("x");
  r.nonfatal("cannot free unaligned L2 table 0x1200");
  r.nonfatal("again");
  EXPECT_EQ(marks, 0);
  EXPECT_FALSE(r.marked_corrupt());
}

}  // namespace
}  // namespace uqcow::qcow2

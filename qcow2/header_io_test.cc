// Unit tests of the header reader and the in-place field writer, on images
// made by write_new_image(); qemu-img info is the independent reader where it
// is installed.
#include "qcow2/header_io.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "engine/sync_wait.h"
#include "qcow2/new_image.h"
#include "tests/testutil.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow::qcow2 {
namespace {

class HeaderIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto reactor = uring::Reactor::create();
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    reactor_ = std::move(reactor).value();
    const char* dir = std::getenv("TEST_TMPDIR");
    path_ = std::string(dir && *dir ? dir : "/tmp") + "/header_io_test." + std::to_string(::getpid()) + ".qcow2";
    CreateOptions o;
    o.size = 1 << 30;
    Status created = run(write_new_image(path_, o));
    ASSERT_TRUE(created.ok()) << created.message();
    RawFileOptions fo;
    fo.read_only = false;
    auto file = RawFile::open(path_, fo);
    ASSERT_TRUE(file.ok()) << file.error().message();
    file_ = std::move(file).value();
  }
  void TearDown() override {
    file_.reset();
    ::unlink(path_.c_str());
  }
  template <class T>
  T run(Task<T> task) {
    return sync_wait(*reactor_, std::move(task));
  }
  Header header() {
    auto h = run(read_image_header(*file_, HeaderUse::kOpen));
    EXPECT_TRUE(h.ok()) << h.error().message();
    return h.ok() ? *h : Header{};
  }
  // qemu-img info's "virtual size" line in bytes, or -1 without qemu-img.
  long long qemu_virtual_size() {
    if (!testing::find_tool("qemu-img")) return -1;
    const testing::CommandResult r = testing::run_command({"qemu-img", "info", "--output=json", "-U", path_});
    const size_t at = r.out.find("\"virtual-size\": ");
    return r.ok() && at != std::string::npos ? std::atoll(r.out.c_str() + at + 16) : -2;
  }

  std::unique_ptr<uring::Reactor> reactor_;
  std::string path_;
  std::unique_ptr<RawFile> file_;
};

TEST_F(HeaderIoTest, OneFieldIsWrittenAndReadBack) {
  ASSERT_EQ(header().size, 1u << 30);
  ASSERT_TRUE(run(write_header_fields(*file_, {kOffSize, 768ull << 20})).ok());
  Header h = header();
  EXPECT_EQ(h.size, 768ull << 20);
  EXPECT_EQ(h.l1_size, 2u) << "the neighbouring fields are untouched";
  long long qemu = qemu_virtual_size();
  if (qemu == -1) GTEST_SKIP() << "qemu-img not installed: checked with our own reader only";
  EXPECT_EQ(qemu, 768ll << 20);
}

TEST_F(HeaderIoTest, AdjacentFieldsGoInOneWrite) {
  Header before = header();
  ASSERT_TRUE(run(write_header_fields(*file_, {kOffNbSnapshots, 0}, {kOffSnapshotsOffset, 0x50000})).ok());
  Header h = header();
  EXPECT_EQ(h.snapshots_offset, 0x50000u);
  EXPECT_EQ(h.nb_snapshots, 0u);
  EXPECT_EQ(h.l1_table_offset, before.l1_table_offset);
  EXPECT_EQ(h.refcount_table_offset, before.refcount_table_offset);
  EXPECT_EQ(h.incompatible_features, before.incompatible_features);
}

TEST_F(HeaderIoTest, RefusesWhatCannotBeWrittenInPlace) {
  Header before = header();
  // Not adjacent: l1_size (36) and refcount_table_offset (48).
  Status gap = run(write_header_fields(*file_, {kOffL1Size, 4}, {kOffRefcountTableOffset, 0}));
  EXPECT_EQ(gap.code(), EINVAL);
  // Out of order.
  Status order = run(write_header_fields(*file_, {kOffL1TableOffset, 0}, {kOffL1Size, 4}));
  EXPECT_EQ(order.code(), EINVAL);
  // Fields only create writes.
  EXPECT_EQ(run(write_header_fields(*file_, {kOffClusterBits, 12})).code(), EINVAL);
  EXPECT_EQ(run(write_header_fields(*file_, {kOffVersion, 2})).code(), EINVAL);
  // A 32-bit field given a 64-bit value.
  Status wide = run(write_header_fields(*file_, {kOffL1Size, 1ull << 32}));
  EXPECT_EQ(wide.code(), EINVAL);
  EXPECT_NE(wide.message().find("32 bits"), std::string::npos) << wide.message();
  Header after = header();
  EXPECT_EQ(after.l1_size, before.l1_size);
  EXPECT_EQ(after.refcount_table_offset, before.refcount_table_offset);
  EXPECT_EQ(after.cluster_bits, before.cluster_bits);
}

TEST_F(HeaderIoTest, ReaderNamesTheBadField) {
  ASSERT_TRUE(run(write_header_fields(*file_, {kOffL1TableOffset, 0x12345})).ok());
  auto h = run(read_image_header(*file_, HeaderUse::kOpen));
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.error().code(), EINVAL);
  EXPECT_NE(h.error().message().find("l1_table_offset"), std::string::npos) << h.error().message();
  EXPECT_NE(h.error().message().find(path_), std::string::npos) << "names the file";
}

}  // namespace
}  // namespace uqcow::qcow2

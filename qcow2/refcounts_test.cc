// Unit tests of the Refcounts component alone, over a fresh image made by
// write_new_image(): nothing but the header, the refcount structure and an
// empty L1 table is referenced, so every cluster allocated here shows up in
// `qemu-img check` as a leak, and every one given back disappears from it.
#include "qcow2/refcounts.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "engine/sync_wait.h"
#include "qcow2/new_image.h"
#include "qcow2/header_io.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;

class RefcountsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto reactor = uring::Reactor::create();
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    reactor_ = std::move(reactor).value();
    const char* dir = std::getenv("TEST_TMPDIR");
    path_ = std::string(dir && *dir ? dir : "/tmp") + "/refcounts_test." + std::to_string(::getpid()) + ".qcow2";
    CreateOptions o;
    o.size = 1 << 30;
    o.refcount_bits = 2;  // small counts: overflow is reachable
    ASSERT_TRUE(run(write_new_image(path_, o)).ok());
    RawFileOptions fo;
    fo.read_only = false;
    auto file = RawFile::open(path_, fo);
    ASSERT_TRUE(file.ok()) << file.error().message();
    file_ = std::move(file).value();
    auto h = run(read_image_header(*file_, HeaderUse::kOpen));
    ASSERT_TRUE(h.ok()) << h.error().message();
    header_ = *h;
    geo_ = header_.geometry();
    auto l2 = MetadataCache::create("L2", *file_, 4096, 4);
    auto rc = MetadataCache::create("refcount", *file_, kCluster, 4);
    ASSERT_TRUE(l2.ok() && rc.ok());
    l2_cache_ = std::move(l2).value();
    reporter_ = std::make_unique<CorruptionReporter>(path_, false, [this] { ++marks_; });
    overlap_ = std::make_unique<OverlapGuard>(*reporter_, kCluster, true);
    refcounts_ = std::make_unique<Refcounts>(*file_, header_, geo_, std::move(rc).value(), *l2_cache_, *overlap_,
                                             *reporter_);
    ASSERT_TRUE(run(refcounts_->load_refcount_table()).ok());
  }
  void TearDown() override {
    refcounts_.reset();
    file_.reset();
    ::unlink(path_.c_str());
  }
  template <class T>
  T run(Task<T> task) {
    return sync_wait(*reactor_, std::move(task));
  }
  void flush() {
    ASSERT_TRUE(run(refcounts_->cache().flush()).ok());
    ASSERT_TRUE(run(file_->co_flush()).ok());
  }
  // Leaked clusters by qemu-img check, or -1 without qemu-img.
  long long qemu_leaks() {
    if (std::system("command -v qemu-img >/dev/null 2>&1") != 0) return -1;
    std::string cmd = "qemu-img check -U --output=json " + path_ + " 2>&1";
    FILE* p = ::popen(cmd.c_str(), "r");
    std::string out;
    char buf[4096];
    size_t n;
    while (p && (n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    if (p) ::pclose(p);
    EXPECT_NE(out.find("\"check-errors\": 0"), std::string::npos) << out;
    const size_t at = out.find("\"leaks\": ");
    return at == std::string::npos ? 0 : std::atoll(out.c_str() + at + 9);
  }

  std::unique_ptr<uring::Reactor> reactor_;
  std::string path_;
  std::unique_ptr<RawFile> file_;
  Header header_;
  Geometry geo_;
  std::unique_ptr<MetadataCache> l2_cache_;
  std::unique_ptr<CorruptionReporter> reporter_;
  std::unique_ptr<OverlapGuard> overlap_;
  std::unique_ptr<Refcounts> refcounts_;
  int marks_ = 0;
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

// A test fixture for the components over the mapping and the refcounts: an
// image (by default a fresh one made by write_new_image(); a test may make
// its own in make_image()), opened as a file, its header read, a corruption
// reporter that counts marks, an overlap guard, a ClusterMap (owning the L2
// cache, L1 table loaded) and Refcounts (table loaded). In a fresh image
// nothing but the header, the refcount structure and an empty L1 table is
// referenced, so every cluster allocated shows up in `qemu-img check` as a
// leak, and every one given back disappears from it.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "engine/sync_wait.h"
#include "qcow2/cache.h"
#include "qcow2/cluster_map.h"
#include "qcow2/corruption.h"
#include "qcow2/header_io.h"
#include "qcow2/new_image.h"
#include "qcow2/overlap_guard.h"
#include "qcow2/refcounts.h"
#include "tests/testutil.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow::qcow2 {

class ComponentFixture : public ::testing::Test {
 protected:
  static constexpr uint64_t kCluster = 65536;
  explicit ComponentFixture(uint32_t refcount_bits = 16) : refcount_bits_(refcount_bits) {}
  void SetUp() override {
    auto reactor = uring::Reactor::create();
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    reactor_ = std::move(reactor).value();
    const char* dir = std::getenv("TEST_TMPDIR");
    path_ = std::string(dir && *dir ? dir : "/tmp") + "/component_test." + std::to_string(::getpid()) + ".qcow2";
    make_image();
    if (HasFatalFailure() || IsSkipped()) return;
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
    reporter_ = std::make_unique<CorruptionReporter>(path_, false, [this] { ++marks_; });
    overlap_ = std::make_unique<OverlapGuard>(*reporter_, kCluster, true);
    map_ = std::make_unique<ClusterMap>(*file_, header_, geo_, std::move(l2).value(), 4096, *overlap_);
    l2_cache_ = &map_->l2_cache();
    ASSERT_TRUE(run(map_->load_l1(header_.l1_table_offset, header_.l1_size)).ok());
    refcounts_ = std::make_unique<Refcounts>(*file_, header_, geo_, std::move(rc).value(), *l2_cache_, *overlap_,
                                             *reporter_);
    ASSERT_TRUE(run(refcounts_->load_refcount_table()).ok());
  }
  void TearDown() override {
    refcounts_.reset();
    map_.reset();
    file_.reset();
    ::unlink(path_.c_str());
  }
  // Writes the image at path_ (1 GiB, refcount_bits_ wide refcounts).
  virtual void make_image() {
    CreateOptions o;
    o.size = 1 << 30;
    o.refcount_bits = refcount_bits_;
    ASSERT_TRUE(run(write_new_image(path_, o)).ok());
  }
  template <class T>
  T run(Task<T> task) {
    return sync_wait(*reactor_, std::move(task));
  }
  void flush() {
    ASSERT_TRUE(run(refcounts_->cache().flush()).ok());
    ASSERT_TRUE(run(file_->co_flush()).ok());
  }
  // The refcount of the cluster at host offset `host` (all ones on error).
  uint64_t refcount(uint64_t host) {
    auto rc = run(refcounts_->get_refcount(host / kCluster));
    EXPECT_TRUE(rc.ok()) << rc.error().message();
    return rc.ok() ? *rc : ~uint64_t{0};
  }
  static bool have_qemu_img() { return testing::find_tool("qemu-img").has_value(); }
  // Leaked clusters by qemu-img check, or -1 without qemu-img.
  long long qemu_leaks() {
    if (!testing::find_tool("qemu-img")) return -1;
    const testing::CommandResult r = testing::run_command({"qemu-img", "check", "-U", "--output=json", path_});
    EXPECT_NE(r.out.find("\"check-errors\": 0"), std::string::npos) << r.describe();
    const size_t at = r.out.find("\"leaks\": ");
    return at == std::string::npos ? 0 : std::atoll(r.out.c_str() + at + 9);
  }
  // Runs qemu-io read-only on the image with commands `cmds`: "" when every
  // command succeeded (a pattern mismatch is a failure), its output
  // otherwise; "" without qemu-io.
  std::string qemu_io(const std::vector<std::string>& cmds) {
    if (!testing::find_tool("qemu-io")) return "";
    std::vector<std::string> argv = {"qemu-io", "-f", "qcow2", "-r", "-U"};
    for (const auto& c : cmds) {
      argv.push_back("-c");
      argv.push_back(c);
    }
    argv.push_back(path_);
    const testing::CommandResult r = testing::run_command(argv);
    const bool failed = !r.ok() || r.out.find("fail") != std::string::npos || r.err.find("fail") != std::string::npos;
    return failed ? r.describe() : "";
  }

  uint32_t refcount_bits_;
  std::unique_ptr<uring::Reactor> reactor_;
  std::string path_;
  std::unique_ptr<RawFile> file_;
  Header header_;
  Geometry geo_;
  std::unique_ptr<ClusterMap> map_;
  MetadataCache* l2_cache_ = nullptr;  // the map's
  std::unique_ptr<CorruptionReporter> reporter_;
  std::unique_ptr<OverlapGuard> overlap_;
  std::unique_ptr<Refcounts> refcounts_;
  int marks_ = 0;
};

}  // namespace uqcow::qcow2

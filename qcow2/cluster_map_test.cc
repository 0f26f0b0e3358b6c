// Unit tests of the ClusterMap alone: an L1 table and L2 slices built by
// hand in its cache (no image writes), decoded as docs/interop/qcow2.txt
// says, with the damage the read path must refuse.
#include "qcow2/cluster_map.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <string>

#include "engine/sync_wait.h"
#include "qcow2/new_image.h"
#include "qcow2/header_io.h"
#include "qcow2/tables.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

namespace uqcow::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;
constexpr uint32_t kSlice = 4096;  // 512 entries a slice

class ClusterMapTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    auto reactor = uring::Reactor::create();
    ASSERT_TRUE(reactor.ok()) << reactor.error().message();
    reactor_ = std::move(reactor).value();
    const char* dir = std::getenv("TEST_TMPDIR");
    path_ = std::string(dir && *dir ? dir : "/tmp") + "/cluster_map_test." + std::to_string(::getpid()) + ".qcow2";
    CreateOptions o;
    o.size = 4ull << 30;
    o.extended_l2 = GetParam();
    ASSERT_TRUE(run(write_new_image(path_, o)).ok());
    auto file = RawFile::open(path_, RawFileOptions{.read_only = true, .lock = {}});
    ASSERT_TRUE(file.ok()) << file.error().message();
    file_ = std::move(file).value();
    auto h = run(read_image_header(*file_, HeaderUse::kOpen));
    ASSERT_TRUE(h.ok());
    header_ = *h;
    geo_ = header_.geometry();
    auto cache = MetadataCache::create("L2", *file_, kSlice, 8);
    ASSERT_TRUE(cache.ok());
    reporter_ = std::make_unique<CorruptionReporter>(path_, true, nullptr);
    overlap_ = std::make_unique<OverlapGuard>(*reporter_, kCluster, true);
    MetadataRegions r;
    r.reset(kOverlapCached);
    overlap_->reset(r, kOverlapCached);
    map_ = std::make_unique<ClusterMap>(*file_, header_, geo_, std::move(cache).value(), kSlice, *overlap_);
    ASSERT_TRUE(run(map_->load_l1(header_.l1_table_offset, header_.l1_size)).ok());
  }
  void TearDown() override {
    map_.reset();
    file_.reset();
    ::unlink(path_.c_str());
  }
  template <class T>
  T run(Task<T> task) {
    return sync_wait(*reactor_, std::move(task));
  }
  // Points L1 entry 0 at a made-up L2 table and puts its first slice, all
  // unallocated, in the cache; returns the slice's bytes.
  uint8_t* cached_first_slice(uint64_t l2_table) {
    map_->set_active_l1_entry(0, l2_table | kOflagCopied);
    auto ref = run(map_->l2_cache().get(l2_table, /*fresh=*/true));
    EXPECT_TRUE(ref.ok());
    return ref.ok() ? ref->data() : nullptr;  // stays cached: capacity 8, nothing else loaded
  }
  Result<Mapping> map(uint64_t offset, uint64_t len) {
    Result<Mapping> m = Mapping{};
    EXPECT_TRUE(map_->map_fast(offset, len, m)) << "slice not cached";
    return m;
  }

  std::unique_ptr<uring::Reactor> reactor_;
  std::string path_;
  std::unique_ptr<RawFile> file_;
  Header header_;
  Geometry geo_;
  std::unique_ptr<CorruptionReporter> reporter_;
  std::unique_ptr<OverlapGuard> overlap_;
  std::unique_ptr<ClusterMap> map_;
};

TEST_P(ClusterMapTest, NoL2TableIsUnallocatedToTheEndOfTheL1Entry) {
  auto m = map(100, 8ull << 30);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->type, SubclusterType::kUnallocatedPlain);
  EXPECT_EQ(m->bytes, geo_.l1_entry_coverage() - 100);
}

TEST_P(ClusterMapTest, ContiguousClustersMergeIntoOneRunUpToTheSliceEnd) {
  const uint64_t l2 = 64 * kCluster;
  uint8_t* data = cached_first_slice(l2);
  ASSERT_NE(data, nullptr);
  L2Slice s(data, geo_);
  const uint64_t all = GetParam() ? 0xffffffffull : 0;  // every subcluster allocated
  for (uint64_t i = 0; i < 3; ++i) s.set(i, (100 + i) * kCluster | kOflagCopied, all);
  s.set(3, 200 * kCluster | kOflagCopied, all);  // not contiguous: a new run
  auto m = map(kCluster / 2, 16 * kCluster);
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(m->type, SubclusterType::kNormal);
  EXPECT_TRUE(m->copied);
  EXPECT_EQ(m->host_offset, 100 * kCluster + kCluster / 2);
  EXPECT_EQ(m->bytes, 3 * kCluster - kCluster / 2);
  auto next = map(3 * kCluster, kCluster);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->host_offset, 200 * kCluster);
  // The run never crosses the slice (512 entries).
  for (uint64_t i = 4; i < map_->entries_per_slice(); ++i) s.set(i, (200 + i - 3) * kCluster | kOflagCopied, all);
  auto tail = map(3 * kCluster, 1ull << 40);
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ(tail->bytes, (map_->entries_per_slice() - 3) * kCluster);
}

TEST_P(ClusterMapTest, DamagedEntriesAreRefusedWithTheEntryNamed) {
  const uint64_t l2 = 64 * kCluster;
  uint8_t* data = cached_first_slice(l2);
  ASSERT_NE(data, nullptr);
  L2Slice s(data, geo_);
  s.set(5, 100 * kCluster + 512, GetParam() ? 1 : 0);  // unaligned host offset
  auto m = map(5 * kCluster, 1);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().code(), EIO);
  EXPECT_NE(m.error().message().find("index 5"), std::string::npos) << m.error().message();
  EXPECT_NE(m.error().message().find("not cluster aligned"), std::string::npos) << m.error().message();
  if (GetParam()) {
    s.set(6, 100 * kCluster, 0x0000000100000001ull);  // subcluster 0 both allocated and zero
    auto both = map(6 * kCluster, 1);
    ASSERT_FALSE(both.ok());
    EXPECT_NE(both.error().message().find("both allocated and zero"), std::string::npos) << both.error().message();
  } else {
    EXPECT_EQ(map_->l2_entry_problem(kOflagZero, 0), nullptr) << "a v3 image may have zero clusters";
  }
  // An unaligned L2 table offset in the L1 table.
  map_->set_active_l1_entry(1, 7 * kCluster + 512);
  auto l1bad = map_->l2_table_of(geo_.l1_entry_coverage());
  ASSERT_FALSE(l1bad.ok());
  EXPECT_NE(l1bad.error().message().find("L1 index 1"), std::string::npos) << l1bad.error().message();
}

TEST_P(ClusterMapTest, L1WritersKeepTheActiveL2RegionsInStep) {
  map_->set_active_l1_entry(0, 64 * kCluster | kOflagCopied);
  EXPECT_EQ(overlap_->find_overlap(64 * kCluster, 1, kOverlapCached), MetadataKind::kActiveL2);
  std::vector<uint64_t> table(map_->l1().size(), 0);
  table[1] = 80 * kCluster;
  map_->replace_l1(table);
  EXPECT_FALSE(overlap_->find_overlap(64 * kCluster, 1, kOverlapCached).has_value());
  EXPECT_EQ(overlap_->find_overlap(80 * kCluster, 1, kOverlapCached), MetadataKind::kActiveL2);
  EXPECT_EQ(map_->l1()[1], 80 * kCluster);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ClusterMapTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "ExtendedL2" : "Standard"; });

}  // namespace
}  // namespace uqcow::qcow2

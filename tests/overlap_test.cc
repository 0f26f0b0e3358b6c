// QEMU's metadata overlap check (issue 13): the kinds each overlap-check
// level covers, decided the same way as qemu-io on a copy of the same damaged
// image, and the bookkeeping that keeps the checked regions exact.
//
// The damaged image (the reproduction): qemu-img makes an image with
// data in guest cluster 0, takes internal snapshot s1, and a guest write then
// copies the active L2 table (so the snapshot's L2 table is no longer an
// active one). The active L2 entry of guest cluster 1 is then pointed, with
// OFLAG_COPIED, at the snapshot's L2 table ("inactive L2 table") or at the
// snapshot's L1 table ("inactive L1 table"), and a 4 KiB guest write to
// cluster 1 goes in place over that table unless the overlap check stops it.
//
// QEMU's levels (block/qcow2.h): constant has neither; cached (the default)
// has inactive L1 but not inactive L2; all has both. Each case asserts that
// qemu-io makes that decision, that uqcow makes the same, and then: when
// refused, the image is marked corrupt, the table is unchanged, snapshot s1
// reads back as it was, and `uqcow check -r all` is the way back (qemu-img
// check agrees); when written, both tools wrote the same bytes over the table.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "block/open.h"
#include "block/options.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/overlap.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

using qcow2::MetadataKind;
using qcow2::MetadataRegions;
using qcow2::overlap_bit;

constexpr uint64_t kIncompatibleFeatures = 72;
constexpr uint64_t kL1TableOffset = 40;
constexpr uint64_t kSnapshotsOffset = 64;
constexpr uint64_t kEntryMask = 0x00fffffffffffe00ull;
constexpr uint64_t kCluster = 64 << 10;  // qemu-img's default cluster size

// ---- MetadataRegions --------------------------------------------------------

TEST(MetadataRegions, ARegionStaysUntilEveryReferenceIsRemoved) {
  MetadataRegions r;
  r.reset(qcow2::kOverlapAll);
  // An L2 table that two snapshots share.
  r.add(MetadataKind::kInactiveL2, 0x40000, kCluster);
  r.add(MetadataKind::kInactiveL2, 0x40000, kCluster);
  EXPECT_EQ(r.count(MetadataKind::kInactiveL2), 1u);
  r.remove(MetadataKind::kInactiveL2, 0x40000, kCluster);
  EXPECT_EQ(r.overlaps(0x40000, 512, qcow2::kOverlapAll), MetadataKind::kInactiveL2);
  r.remove(MetadataKind::kInactiveL2, 0x40000, kCluster);
  EXPECT_EQ(r.overlaps(0x40000, 512, qcow2::kOverlapAll), std::nullopt);
  r.remove(MetadataKind::kInactiveL2, 0x40000, kCluster);  // no reference left: no-op
  EXPECT_EQ(r.count(MetadataKind::kInactiveL2), 0u);
}

TEST(MetadataRegions, BoundariesAreHalfOpen) {
  MetadataRegions r;
  r.reset(qcow2::kOverlapAll);
  r.add(MetadataKind::kRefcountBlock, 0x20000, kCluster);
  EXPECT_EQ(r.overlaps(0x10000, 0x10000, qcow2::kOverlapAll), std::nullopt);
  EXPECT_EQ(r.overlaps(0x30000, 0x10000, qcow2::kOverlapAll), std::nullopt);
  EXPECT_EQ(r.overlaps(0x2ffff, 1, qcow2::kOverlapAll), MetadataKind::kRefcountBlock);
  EXPECT_EQ(r.overlaps(0x1ffff, 2, qcow2::kOverlapAll), MetadataKind::kRefcountBlock);
  EXPECT_EQ(r.overlaps(0x20000, 0, qcow2::kOverlapAll), std::nullopt);
}

TEST(MetadataRegions, ReportsTheKindQemuChecksFirst) {
  // A table both the active L1 and a snapshot's L1 point at: QEMU checks
  // active L2 before inactive L2, and reports the first hit.
  MetadataRegions r;
  r.reset(qcow2::kOverlapAll);
  r.add(MetadataKind::kActiveL2, 0x50000, kCluster);
  r.add(MetadataKind::kInactiveL2, 0x50000, kCluster);
  EXPECT_EQ(r.overlaps(0x50000, 4096, qcow2::kOverlapAll), MetadataKind::kActiveL2);
  // A cache write of an active L2 table ignores its own kind (QEMU's `ign`).
  EXPECT_EQ(r.overlaps(0x50000, 4096, qcow2::kOverlapAll & ~overlap_bit(MetadataKind::kActiveL2)),
            MetadataKind::kInactiveL2);
  EXPECT_EQ(r.overlaps(0x50000, 4096, qcow2::kOverlapCached & ~overlap_bit(MetadataKind::kActiveL2)),
            std::nullopt);
}

TEST(MetadataRegions, FindsARegionThatStartsBeforeItsPredecessor) {
  // Regions of one kind may overlap in a damaged image (two snapshot L1
  // tables): a query must find the long one behind the short one.
  MetadataRegions r;
  r.reset(qcow2::kOverlapAll);
  r.add(MetadataKind::kInactiveL1, 0x100000, 0x80000);
  r.add(MetadataKind::kInactiveL1, 0x140000, kCluster);
  EXPECT_EQ(r.overlaps(0x160000, 4096, qcow2::kOverlapAll), MetadataKind::kInactiveL1);
  EXPECT_EQ(r.overlaps(0x180000, 4096, qcow2::kOverlapAll), std::nullopt);
}

TEST(MetadataRegions, RemovedRegionsStopMatchingAcrossIndexRebuilds) {
  // 300 L2 tables, every other one unlinked: removals leave the merged
  // index a superset until it is rebuilt; neither may change an answer.
  MetadataRegions r;
  r.reset(qcow2::kOverlapAll);
  for (uint64_t i = 0; i < 300; ++i) r.add(MetadataKind::kActiveL2, (i + 1) * kCluster, kCluster);
  for (uint64_t i = 0; i < 300; i += 2) {
    r.remove(MetadataKind::kActiveL2, (i + 1) * kCluster, kCluster);
    EXPECT_EQ(r.overlaps((i + 1) * kCluster, 4096, qcow2::kOverlapAll), std::nullopt) << i;
  }
  for (uint64_t i = 0; i < 300; ++i) {
    const auto want = i % 2 ? std::optional(MetadataKind::kActiveL2) : std::nullopt;
    EXPECT_EQ(r.overlaps((i + 1) * kCluster + 512, 512, qcow2::kOverlapAll), want) << i;
  }
  EXPECT_EQ(r.count(MetadataKind::kActiveL2), 150u);
}

TEST(MetadataRegions, KeepsOnlyTheTrackedKinds) {
  MetadataRegions r;
  r.reset(qcow2::kOverlapCached);
  r.add(MetadataKind::kInactiveL2, 0x40000, kCluster);
  EXPECT_EQ(r.count(MetadataKind::kInactiveL2), 0u);
  EXPECT_EQ(r.overlaps(0x40000, 4096, qcow2::kOverlapAll), std::nullopt);
  MetadataRegions other;
  other.reset(qcow2::kOverlapCached);
  EXPECT_TRUE(r == other);
  other.add(MetadataKind::kActiveL2, 0x40000, kCluster);
  EXPECT_FALSE(r == other);
  EXPECT_NE(r.describe_difference(other).find("active L2 table"), std::string::npos) << r.describe_difference(other);
}

// ---- options ----------------------------------------------------------------

uint32_t mask_of(const std::vector<std::pair<std::string, std::string>>& opts) {
  OpenOptions o;
  for (const auto& [k, v] : opts) {
    Status s = apply_open_option(o, k, v);
    EXPECT_TRUE(s.ok()) << k << "=" << v << ": " << s.message();
  }
  return qcow2::overlap_check_mask(o);
}

TEST(OverlapOptions, LevelsAreQemus) {
  // QCOW2_OL_CONSTANT, QCOW2_OL_CACHED, QCOW2_OL_ALL by QEMU's bit numbers
  // (plus uqcow's crypto header, bit 9, in every level but none).
  const uint32_t crypto = overlap_bit(MetadataKind::kCryptoHeader);
  EXPECT_EQ(mask_of({{"overlap-check", "none"}}), 0u);
  EXPECT_EQ(mask_of({{"overlap-check", "constant"}}), 0x12bu | crypto);
  EXPECT_EQ(mask_of({{"overlap-check", "cached"}}), 0x17fu | crypto);
  EXPECT_EQ(mask_of({{"overlap-check", "all"}}), 0x1ffu | crypto);
  EXPECT_EQ(mask_of({}), 0x17fu | crypto) << "QEMU's default is cached";
  EXPECT_EQ(mask_of({{"overlap-check.template", "all"}}), 0x1ffu | crypto);
}

TEST(OverlapOptions, PerKindSwitchesOverrideTheTemplateInAnyOrder) {
  const uint32_t l2 = overlap_bit(MetadataKind::kInactiveL2);
  const uint32_t l1 = overlap_bit(MetadataKind::kInactiveL1);
  const uint32_t cached = mask_of({{"overlap-check", "cached"}});
  EXPECT_EQ(mask_of({{"overlap-check.inactive-l2", "on"}, {"overlap-check", "cached"}}), cached | l2);
  EXPECT_EQ(mask_of({{"overlap-check", "all"}, {"overlap-check.inactive-l1", "off"}}), (cached | l2) & ~l1);
  EXPECT_EQ(mask_of({{"overlap-check", "none"}, {"overlap-check.main-header", "on"}}),
            overlap_bit(MetadataKind::kMainHeader));
  EXPECT_EQ(mask_of({{"overlap-check.inactive-l2", "on"}, {"overlap-check.inactive-l2", "off"}}), cached);
  OpenOptions o;
  EXPECT_EQ(apply_open_option(o, "overlap-check.crypto-header", "on").code(), EINVAL);
  EXPECT_EQ(apply_open_option(o, "overlap-check.inactive-l2", "maybe").code(), EINVAL);
  EXPECT_EQ(apply_open_option(o, "overlap-check", "some").code(), EINVAL);
}

// ---- the damaged image, against qemu-io --------------------------------------

struct Layout {
  uint64_t active_l2 = 0;
  uint64_t snapshot_l1 = 0;
  uint64_t snapshot_l2 = 0;
};

// Reads the layout from the file: header -> active L1 -> active L2; snapshot
// table entry 0 -> snapshot L1 -> snapshot L2.
std::optional<Layout> read_layout(const std::string& path) {
  auto l1 = peek_be64(path, kL1TableOffset);
  auto snapshots = peek_be64(path, kSnapshotsOffset);
  if (!l1 || !snapshots) return std::nullopt;
  auto active_l1e = peek_be64(path, *l1);
  auto snapshot_l1 = peek_be64(path, *snapshots);
  if (!active_l1e || !snapshot_l1) return std::nullopt;
  auto snapshot_l1e = peek_be64(path, *snapshot_l1);
  if (!snapshot_l1e) return std::nullopt;
  return Layout{*active_l1e & kEntryMask, *snapshot_l1, *snapshot_l1e & kEntryMask};
}

std::vector<uint8_t> cluster_at(const std::string& path, uint64_t offset) {
  auto bytes = read_file(path);
  if (!bytes || bytes->size() < offset + kCluster) return {};
  return std::vector<uint8_t>(bytes->begin() + offset, bytes->begin() + offset + kCluster);
}

bool corrupt_bit(const std::string& path) {
  auto v = peek_be64(path, kIncompatibleFeatures);
  return v && (*v & qcow2::kIncompatCorrupt);
}

// Snapshot s1 as qemu-img reads it (raw), or "" with why it failed.
std::string snapshot_raw(const TempDir& dir, const std::string& image, const std::string& out) {
  CommandResult r = run_command(
      {"qemu-img", "convert", "-U", "-f", "qcow2", "-l", "snapshot.name=s1", "-O", "raw", image, out}, dir.path());
  return r.ok() ? "" : r.describe();
}

// ---- bookkeeping across operations ------------------------------------------

// Under overlap-check=all the regions kept in memory stay the ones a fresh
// walk of the tables finds, after each operation that adds, moves or unlinks
// metadata; and no legitimate write is refused: clusters of L2 tables freed
// with a deleted snapshot are reused without a false overlap. qemu-img check
// and qemu-io are the oracles for the image and the data.
TEST(OverlapBookkeeping, RegionsStayExactAcrossSnapshotsAndGrowth) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  constexpr uint64_t KiB = 1024, MiB = 1 << 20;
  TempDir dir("overlap-book");
  ImageBuilder b(dir.path());
  // 512-byte clusters, 16-bit refcounts: one L2 table maps 32 KiB, one
  // refcount block counts 128 KiB, and the one-cluster refcount table 8 MiB.
  b.create("img.qcow2", "qcow2", "cluster_size=512", 4 * MiB);
  ASSERT_TRUE(b.ok()) << b.error();
  const std::string path = dir.file("img.qcow2");
  const auto reftable_before = peek_be64(path, 48);
  const auto l1_before = peek_be64(path, kL1TableOffset);
  OpenOptions o;
  o.read_only = false;
  ASSERT_TRUE(apply_open_option(o, "overlap-check", "all").ok());
  auto disk = SyncDisk::open(path, o);
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  SyncDisk& d = **disk;
  auto* image = dynamic_cast<qcow2::Qcow2Image*>(&d.disk());
  ASSERT_NE(image, nullptr);
  auto verify = [&](const std::string& step) {
    Status s = d.run(image->verify_metadata_regions());
    EXPECT_TRUE(s.ok()) << "after " << step << ": " << s.message();
  };
  auto write = [&](uint64_t offset, uint64_t length, uint8_t pattern) {
    std::vector<uint8_t> data(64 * KiB, pattern);
    for (uint64_t done = 0; done < length; done += data.size()) {
      Status s = d.run(d.disk().write(offset + done, std::as_bytes(std::span(data))));
      ASSERT_TRUE(s.ok()) << "write at " << offset + done << ": " << s.message();
    }
    verify("write of " + std::to_string(length) + " bytes at " + std::to_string(offset));
  };
  auto ok = [&](Task<Status> op, const std::string& step) {
    Status s = d.run(std::move(op));
    ASSERT_TRUE(s.ok()) << step << ": " << s.message();
    verify(step);
  };
  verify("open");
  write(0, 1 * MiB, 0x01);  // L2 allocations
  ok(image->resize(64 * MiB), "resize (L1 growth)");
  ok(image->snapshot_create("a"), "snapshot -c a");
  write(0, 512 * KiB, 0x02);  // copies L2 tables shared with a
  write(16 * MiB, 12 * MiB, 0x03);  // refcount table growth
  ok(image->snapshot_create("b"), "snapshot -c b");
  write(20 * MiB, 1 * MiB, 0x04);
  ok(image->snapshot_apply("a"), "snapshot -a a");
  write(256 * KiB, 512 * KiB, 0x05);
  ok(image->snapshot_delete("b"), "snapshot -d b");  // frees b's own L2 tables
  write(32 * MiB, 12 * MiB, 0x06);  // reuses them
  ok(image->snapshot_delete("a"), "snapshot -d a");
  write(0, 64 * KiB, 0x07);
  ASSERT_TRUE(d.close().ok());
  disk->reset();

  EXPECT_NE(peek_be64(path, 48), reftable_before) << "premise: the refcount table grew";
  EXPECT_NE(peek_be64(path, kL1TableOffset), l1_before) << "premise: the L1 table grew";
  EXPECT_FALSE(corrupt_bit(path));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", path})));
  CommandResult read = run_command({"qemu-io", "-r", "-c", "read -P 0x07 0 64k", "-c", "read -P 0x01 64k 192k",
                                    "-c", "read -P 0x05 256k 512k", "-c", "read -P 0x01 768k 256k", "-c",
                                    "read -P 0 1M 31M", "-c", "read -P 0x06 32M 12M", "-c", "read -P 0 44M 20M",
                                    path});
  EXPECT_TRUE(Succeeded(read));
  EXPECT_EQ(read.out.find("verification failed"), std::string::npos) << read.describe();
}

// Snapshot apply and delete rewrite OFLAG_COPIED in the L2 tables of the L1
// they walk, which other snapshots may share: legitimate writes to inactive
// L2 tables, which `all` must let through. qemu-img makes such a table:
// deleting s1 sets COPIED in the table s1 shared with s2 (the data there now
// has refcount 1); applying s2 then clears it again. (qemu-img snapshot -a
// with overlap-check=all refuses that write and marks the image corrupt;
// uqcow deliberately exempts its own snapshot walks.)
TEST(OverlapBookkeeping, SnapshotApplyRewritesASharedTableUnderAll) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  TempDir dir("overlap-apply");
  ImageBuilder b(dir.path());
  b.create("img.qcow2", "qcow2", "", 64 << 20);
  b.write("img.qcow2", "qcow2", {P(0, 128 << 10, 0x11)});
  b.run({"qemu-img", "snapshot", "-c", "s1", "img.qcow2"});
  b.run({"qemu-img", "snapshot", "-c", "s2", "img.qcow2"});
  b.write("img.qcow2", "qcow2", {P(0, 128 << 10, 0x22)});
  b.run({"qemu-img", "snapshot", "-d", "s1", "img.qcow2"});
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  const std::string path = dir.file("img.qcow2");
  auto layout = read_layout(path);  // snapshot entry 0 is now s2
  ASSERT_TRUE(layout.has_value());
  auto entry = peek_be64(path, layout->snapshot_l2);
  ASSERT_TRUE(entry && (*entry & qcow2::kOflagCopied)) << "premise: qemu-img set COPIED in s2's L2 table";
  CommandResult apply = run_uqcow({"snapshot", "--image-opt", "overlap-check=all", "-a", "s2", path});
  EXPECT_TRUE(Succeeded(apply));
  EXPECT_FALSE(corrupt_bit(path));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", path})));
  CommandResult read = run_command({"qemu-io", "-r", "-c", "read -P 0x11 0 128k", path});
  EXPECT_TRUE(Succeeded(read));
  EXPECT_EQ(read.out.find("verification failed"), std::string::npos) << read.describe();
}

enum class Target { kInactiveL2, kInactiveL1 };

struct Case {
  const char* name;
  Target target;
  // Runtime options, comma-separated, as given to qemu-io --image-opts
  // (empty: the defaults) and to uqcow one by one.
  std::string options;
  bool qemu_refuses;  // QEMU's decision by its definitions of the levels
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

std::vector<std::pair<std::string, std::string>> split_options(const std::string& s) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t start = 0;
  while (start < s.size()) {
    size_t comma = s.find(',', start);
    std::string kv = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    size_t eq = kv.find('=');
    out.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

class DamagedImage : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ImageBuilder b(dir_.path());
    b.create("base.qcow2", "qcow2", "", 64 << 20);
    b.write("base.qcow2", "qcow2", {P(0, kCluster, 0x11)});
    b.run({"qemu-img", "snapshot", "-c", "s1", "base.qcow2"});
    b.write("base.qcow2", "qcow2", {P(0, 4096, 0x22)});  // copies the L2 table
    ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
    ASSERT_EQ(snapshot_raw(dir_, "base.qcow2", "s1.raw"), "");
    auto layout = read_layout(dir_.file("base.qcow2"));
    ASSERT_TRUE(layout.has_value());
    layout_ = *layout;
    ASSERT_NE(layout_.active_l2, layout_.snapshot_l2) << "the guest write did not copy the L2 table";
    target_ = GetParam().target == Target::kInactiveL2 ? layout_.snapshot_l2 : layout_.snapshot_l1;
    // Guest cluster 1 (unallocated) now points in place at the table.
    ASSERT_TRUE(patch_be64(dir_.file("base.qcow2"), layout_.active_l2 + 8, target_ | qcow2::kOflagCopied));
    table_before_ = cluster_at(dir_.file("base.qcow2"), target_);
    ASSERT_FALSE(table_before_.empty());
    auto bytes = read_file(dir_.file("base.qcow2"));
    ASSERT_TRUE(bytes && write_file(dir_.file("q.qcow2"), *bytes) && write_file(dir_.file("u.qcow2"), *bytes));
  }

  OpenOptions uqcow_options() const {
    OpenOptions o;
    o.read_only = false;
    for (const auto& [k, v] : split_options(GetParam().options)) {
      Status s = apply_open_option(o, k, v);
      EXPECT_TRUE(s.ok()) << s.message();
    }
    return o;
  }

  // The write through the damaged entry with uqcow; OK or the error.
  Status uqcow_write() {
    UQ_ASSIGN_OR_RETURN(auto disk, SyncDisk::open(dir_.file("u.qcow2"), uqcow_options()));
    std::vector<uint8_t> data(4096, 0x33);
    Status s = disk->run(disk->disk().write(kCluster, std::as_bytes(std::span(data))));
    Status closed = disk->close();
    return s.ok() ? closed : s;
  }

  CommandResult qemu_write() {
    std::string spec = "driver=qcow2,file.filename=q.qcow2";
    if (!GetParam().options.empty()) spec += "," + GetParam().options;
    return run_command({"qemu-io", "--image-opts", "-c", "write -P 0x33 64k 4k", spec}, dir_.path());
  }

  std::string kind_name() const {
    return GetParam().target == Target::kInactiveL2 ? "inactive L2 table" : "inactive L1 table";
  }

  TempDir dir_{"overlap"};
  Layout layout_;
  uint64_t target_ = 0;
  std::vector<uint8_t> table_before_;
};

TEST_P(DamagedImage, SameDecisionAsQemuIo) {
  if (IsSkipped()) return;
  const Case& c = GetParam();
  CommandResult q = qemu_write();
  const bool qemu_refused = q.out.find("write failed") != std::string::npos ||
                            q.err.find("write failed") != std::string::npos;
  ASSERT_EQ(qemu_refused, c.qemu_refuses) << "premise: QEMU's decision for " << c.name << "\n" << q.describe();
  Status u = uqcow_write();
  EXPECT_EQ(!u.ok(), qemu_refused) << "uqcow: " << (u.ok() ? "wrote" : u.message()) << "\nqemu-io:\n"
                                   << q.describe();
  const std::string u_path = dir_.file("u.qcow2");
  if (qemu_refused) {
    EXPECT_EQ(u.code(), EIO) << u.message();
    EXPECT_NE(u.message().find("overlaps with " + kind_name()), std::string::npos) << u.message();
    EXPECT_NE(q.err.find("overlaps with " + kind_name()), std::string::npos) << q.describe();
    EXPECT_TRUE(corrupt_bit(dir_.file("q.qcow2")));
    EXPECT_TRUE(corrupt_bit(u_path)) << "corrupt bit not set on disk";
    EXPECT_TRUE(SameBytes(cluster_at(u_path, target_), table_before_, target_)) << "the " << kind_name()
                                                                               << " was written";
    ASSERT_EQ(snapshot_raw(dir_, "u.qcow2", "u-s1.raw"), "");
    EXPECT_TRUE(SameBytes(*read_file(dir_.file("u-s1.raw")), *read_file(dir_.file("s1.raw"))))
        << "snapshot s1 changed";
  } else {
    EXPECT_FALSE(corrupt_bit(u_path));
    EXPECT_FALSE(corrupt_bit(dir_.file("q.qcow2")));
    // Both tools wrote the guest data over the table, in place.
    EXPECT_TRUE(SameBytes(cluster_at(u_path, target_), cluster_at(dir_.file("q.qcow2"), target_), target_));
    EXPECT_FALSE(SameBytes(cluster_at(u_path, target_), table_before_, target_)) << "premise: written in place";
  }
}

// The cases QEMU refuses: the image is marked corrupt and must be repaired.
class RefusedWrite : public DamagedImage {};

TEST_P(RefusedWrite, CheckRepairAllIsTheWayBack) {
  if (IsSkipped()) return;
  ASSERT_FALSE(uqcow_write().ok());
  const std::string u_path = dir_.file("u.qcow2");
  ASSERT_TRUE(corrupt_bit(u_path));
  CommandResult repair = run_uqcow({"check", "-r", "all", "u.qcow2"}, dir_.path());
  EXPECT_TRUE(Succeeded(repair));
  EXPECT_FALSE(corrupt_bit(u_path)) << "check -r all leaves the corrupt bit set";
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", "u.qcow2"}, dir_.path())));
  // The repaired entry has the table's true refcount (2) and no COPIED, so
  // the same write now copies instead of overwriting.
  ASSERT_TRUE(uqcow_write().ok());
  CommandResult read = run_command({"qemu-io", "-c", "read -P 0x33 64k 4k", "u.qcow2"}, dir_.path());
  EXPECT_TRUE(Succeeded(read));
  EXPECT_EQ(read.out.find("Pattern verification failed"), std::string::npos) << read.describe();
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", "u.qcow2"}, dir_.path())));
  EXPECT_TRUE(SameBytes(cluster_at(u_path, target_), table_before_, target_));
  ASSERT_EQ(snapshot_raw(dir_, "u.qcow2", "u-s1.raw"), "");
  EXPECT_TRUE(SameBytes(*read_file(dir_.file("u-s1.raw")), *read_file(dir_.file("s1.raw"))));
}

const Case kCases[] = {
    {"InactiveL2_Default", Target::kInactiveL2, "", false},
    {"InactiveL2_None", Target::kInactiveL2, "overlap-check=none", false},
    {"InactiveL2_Constant", Target::kInactiveL2, "overlap-check=constant", false},
    {"InactiveL2_Cached", Target::kInactiveL2, "overlap-check=cached", false},
    {"InactiveL2_All", Target::kInactiveL2, "overlap-check=all", true},
    {"InactiveL2_CachedPlusInactiveL2", Target::kInactiveL2, "overlap-check=cached,overlap-check.inactive-l2=on", true},
    {"InactiveL2_AllMinusInactiveL2", Target::kInactiveL2, "overlap-check=all,overlap-check.inactive-l2=off", false},
    {"InactiveL1_Default", Target::kInactiveL1, "", true},
    {"InactiveL1_None", Target::kInactiveL1, "overlap-check=none", false},
    {"InactiveL1_Constant", Target::kInactiveL1, "overlap-check=constant", false},
    {"InactiveL1_Cached", Target::kInactiveL1, "overlap-check=cached", true},
    {"InactiveL1_All", Target::kInactiveL1, "overlap-check=all", true},
    {"InactiveL1_AllMinusInactiveL1", Target::kInactiveL1, "overlap-check=all,overlap-check.inactive-l1=off", false},
};

std::vector<Case> refused_cases() {
  std::vector<Case> out;
  for (const Case& c : kCases) {
    if (c.qemu_refuses) out.push_back(c);
  }
  return out;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(Levels, DamagedImage, ::testing::ValuesIn(kCases), case_name);
INSTANTIATE_TEST_SUITE_P(Levels, RefusedWrite, ::testing::ValuesIn(refused_cases()), case_name);

// The reproduction through the CLI, with both spellings of the level.
TEST(OverlapCli, IoRefusesTheWriteOverAnInactiveL2Table) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  TempDir dir("overlap-cli");
  ImageBuilder b(dir.path());
  b.create("img.qcow2", "qcow2", "", 64 << 20);
  b.write("img.qcow2", "qcow2", {P(0, kCluster, 0x11)});
  b.run({"qemu-img", "snapshot", "-c", "s1", "img.qcow2"});
  b.write("img.qcow2", "qcow2", {P(0, 4096, 0x22)});
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  auto layout = read_layout(dir.file("img.qcow2"));
  ASSERT_TRUE(layout.has_value());
  ASSERT_TRUE(patch_be64(dir.file("img.qcow2"), layout->active_l2 + 8, layout->snapshot_l2 | qcow2::kOflagCopied));
  const std::vector<uint8_t> table_before = cluster_at(dir.file("img.qcow2"), layout->snapshot_l2);
  auto bytes = read_file(dir.file("img.qcow2"));
  ASSERT_TRUE(bytes && write_file(dir.file("copy.qcow2"), *bytes));
  for (const auto& [image, args] :
       std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"img.qcow2", {"--image-opt", "overlap-check=all"}}, {"copy.qcow2", {"--overlap-check", "all"}}}) {
    std::vector<std::string> argv = {"io"};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"-c", "write -P 0x33 64k 4k", image});
    CommandResult r = run_uqcow(argv, dir.path());
    EXPECT_FALSE(r.ok()) << r.describe();
    EXPECT_NE(r.err.find("overlaps with inactive L2 table"), std::string::npos) << r.describe();
    EXPECT_TRUE(corrupt_bit(dir.file(image)));
    EXPECT_TRUE(SameBytes(cluster_at(dir.file(image), layout->snapshot_l2), table_before));
  }
}

}  // namespace
}  // namespace uqcow::testing

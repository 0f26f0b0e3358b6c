// Damaged metadata met during I/O, side by side with QEMU: the recipes of
// qemu-iotests 060 (corruption detection and marking) and 271 (extended L2
// entries), written anew for uqcow.
//
// Each case builds an image with qemu-img/qemu-io, damages it with pokes,
// and runs the same commands through qemu-io (or qemu-img) on one copy and
// `uqcow io` (or the uqcow subcommand) on another. Asserted for both tools,
// so that QEMU is the oracle and a drift in QEMU shows too:
// - the decision: the command fails or succeeds, and the image is marked
//   corrupt (incompatible bit 1) or not, as 060.out / 271.out record;
// - nothing is written through the damaged structure: the bytes the command
//   would have clobbered are unchanged in uqcow's copy;
// - the way back: `check -r all` leaves an image qemu-img check finds clean
//   exactly when qemu-img check -r all does on QEMU's copy.
// Every case runs on the ext4 disk ($TEST_TMPDIR) and on tmpfs (/dev/shm).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

// Where qemu-img 7.2 puts a fresh 64 KiB-cluster image's structures, and its
// first L2 table once guest offset 0 is written (060's own assumptions).
constexpr uint64_t kReftable = 0x10000;
constexpr uint64_t kRefblock = 0x20000;
constexpr uint64_t kL1 = 0x30000;
constexpr uint64_t kL2 = 0x40000;
constexpr uint64_t kCluster = 0x10000;
constexpr uint64_t kIncompatCorruptBit = 2;

struct Poke {
  uint64_t offset;
  std::vector<uint8_t> bytes;
};
Poke be64(uint64_t offset, uint64_t v) {
  Poke p{offset, {}};
  for (int i = 7; i >= 0; --i) p.bytes.push_back(static_cast<uint8_t>(v >> (8 * i)));
  return p;
}
Poke be32(uint64_t offset, uint32_t v) {
  Poke p{offset, {}};
  for (int i = 3; i >= 0; --i) p.bytes.push_back(static_cast<uint8_t>(v >> (8 * i)));
  return p;
}
Poke be16(uint64_t offset, uint16_t v) { return {offset, {static_cast<uint8_t>(v >> 8), static_cast<uint8_t>(v)}}; }

// A byte range of the file that the refused command must not change.
struct Range {
  uint64_t offset, length;
};
// The header cluster apart from the incompatible-features field (72..79),
// where the corrupt bit goes.
const std::vector<Range> kHeaderCluster = {{0, 72}, {80, kCluster - 80}};

enum class Op { kIo, kIoReadOnly, kSnapshotCreate, kShrinkTo32M };

struct Case {
  std::string name;
  std::string create_options;  // qemu-img create -o
  uint64_t size;
  std::vector<std::string> setup;  // qemu-io commands before the damage
  uint64_t truncate_to = 0;        // extend the file first (0: no)
  std::vector<Poke> pokes;
  Op op = Op::kIo;
  std::vector<std::string> commands;  // qemu-io style -c commands
  bool fails;                         // QEMU's decision, from 060.out / 271.out
  bool marked;
  std::vector<Range> untouched;       // in uqcow's copy, after the command
  bool whole_file_untouched = false;  // uqcow: the command changes nothing at all
};

std::vector<Case> cases() {
  std::vector<Case> c;
  const uint64_t m64 = 64ull << 20;
  // --- 060 ---
  c.push_back({"L2ReferenceIntoL1", "", m64, {}, 0, {be64(kL1, 0x8000000000030000)}, Op::kIo,
               {"write -P 0x2a 0 512"}, true, true, {{kL1, 8}}});
  c.push_back({"DataReferenceIntoRefcountBlock", "", m64, {}, kL2 + kCluster,
               {be64(kL1, 0x8000000000040000), be16(kRefblock + 8, 1), be64(kL2, 0x8000000000020000)}, Op::kIo,
               {"write -P 0x2a 0 512"}, true, true, {{kRefblock, kCluster}}});
  c.push_back({"UnallocatedImageHeader", "", m64, {"write 0 64k"}, 0, {be16(kRefblock, 0)}, Op::kIo,
               {"write 64k 64k"}, true, true, kHeaderCluster});
  c.push_back({"UnalignedL1Entry", "", m64, {"write 0 64k"}, 0, {be64(kL1, 0x8000000000042a00)}, Op::kIo,
               {"read 0 64k"}, true, true, {{kL1, 8}}});
  c.push_back({"UnalignedL2Entry", "", m64, {"write 0 64k"}, 0, {be64(kL2, 0x8000000000052a00)}, Op::kIo,
               {"read 0 64k"}, true, true, {{kL2, 8}}});
  c.push_back({"UnalignedL2EntryOnWrite", "", m64, {"write 0 64k"}, 0, {be64(kL2, 0x8000000000052a00)}, Op::kIo,
               {"write -P 7 0 4k"}, true, true, {{kL2, 8}, {0x50000, kCluster}}});
  c.push_back({"UnalignedRefcountTableEntry", "", m64, {}, 0, {be64(kReftable, 0x22a00)}, Op::kIo,
               {"write 0 64k"}, true, true, {{kRefblock, kCluster}}});
  // Freeing a cluster whose offset is unaligned is not fatal: it leaks.
  c.push_back({"NonFatalCorruptionOnFreeing", "", m64, {"write 0 64k"}, 0, {be64(kL2, 0x8000000000052a00)}, Op::kIo,
               {"discard 0 64k"}, false, false, {}});
  // A read-only open reports the damage and marks nothing.
  c.push_back({"ReadOnlyCorruptionReport", "", m64, {"write 0 64k"}, 0, {be64(kL2, 0x8000000000052a00)},
               Op::kIoReadOnly, {"read 0 64k", "read 0 64k"}, true, false, {}, true});
  c.push_back({"NonFatalThenFatal", "", m64, {"write 0 128k"}, 0,
               {be64(kL2, 0x8000000000052a00), be64(kL2 + 8, 0x8000000000062a00)}, Op::kIo,
               {"discard 0 64k", "read 64k 64k"}, true, true, {{kL2 + 8, 8}}});
  c.push_back({"EmptyRefcountTable", "", m64, {}, 0, {be64(kReftable, 0)}, Op::kIo, {"write 0 64k"}, true, true,
               {{kReftable, kCluster}}});
  c.push_back({"EmptyRefcountTableValidL1AndL2", "", m64, {"write 0 64k"}, 0, {be64(kReftable, 0)}, Op::kIo,
               {"write 0 128k"}, true, true, kHeaderCluster});
  c.push_back({"EmptyRefcountBlock", "", m64, {}, 0, {be64(kRefblock, 0)}, Op::kIo, {"write 0 64k"}, true, true,
               kHeaderCluster});
  c.push_back({"EmptyRefcountBlockCompressedWrite", "", m64, {"write 64k 64k"}, 0, {be64(kRefblock, 0)}, Op::kIo,
               {"write -c 0k 64k"}, true, true, kHeaderCluster});
  c.push_back({"WriteToUnalignedPreallocatedZeroCluster", "", m64, {"write 0 64k", "discard 0 64k"}, 0,
               {be64(kL2, 0x8000000000002a01)}, Op::kIo, {"write 0 64k"}, true, true, kHeaderCluster});
  c.push_back({"DiscardWithUnalignedRefcountBlock", "", m64, {"write 0 128k"}, 0, {be64(kReftable, 0x2a00)}, Op::kIo,
               {"discard 0 65537"}, true, true, kHeaderCluster});
  // A snapshot over an L2 entry pointing past the end of the file: QEMU
  // fails (EAGAIN from its refcount code, leaking what it raised before);
  // uqcow refuses before changing anything.
  c.push_back({"SnapshotOverOutOfRangeL2Entry", "", m64, {"write 0 128k"}, 0, {be64(kL2, 0x800000ff00050000)},
               Op::kSnapshotCreate, {}, true, false, {}, true});
  // Shrinking drops refcount blocks that count nothing; one the refcount
  // structures do not cover is corruption, and the size stays.
  c.push_back({"ShrinkOverOutOfBoundsRefcountBlock", "", m64, {}, 0, {be64(kReftable + 8, 0x00ffffff00000000)},
               Op::kShrinkTo32M, {}, true, true, {{24, 8}}});

  // --- 271: corrupted extended L2 entries, for reads and for writes ---
  const uint64_t m1 = 1ull << 20;
  for (std::string cmd : {"read", "write"}) {
    const std::string C = cmd == "read" ? "Read" : "Write";
    // The standard descriptor's "zero" bit is unused with extended L2: ignored.
    c.push_back({C + "ZeroBitOnStandardDescriptorAllocated", "extended_l2=on", m1, {"write -P 0x11 0 2k"}, 0,
                 {{kL2 + 7, {0x01}}}, Op::kIo, {cmd + " -P 0x11 0 1k"}, false, false, {}});
    // Cluster 1 with subcluster 0 both "zero" and "allocated".
    c.push_back({C + "ZeroAndAllocatedBitsAllocated", "extended_l2=on", m1, {"write 32k 128k"}, 0,
                 {be32(kL2 + 24, 1)}, Op::kIo, {cmd + " 0 192k"}, true, true, {{kL2 + 16, 16}}});
    c.push_back({C + "ZeroBitOnStandardDescriptorUnallocated", "extended_l2=on", m1, {"write 256k 1k"}, 0,
                 {{kL2 + 7, {0x01}}}, Op::kIo, {cmd + " 0 1k"}, false, false, {}});
    // An "allocated" bit without a host cluster.
    c.push_back({C + "AllocatedBitWithoutHostCluster", "extended_l2=on", m1, {"write 256k 1k"}, 0,
                 {{kL2 + 15, {0x01}}}, Op::kIo, {cmd + " 0 1k"}, true, true, {{kL2, 16}}});
    c.push_back({C + "ZeroAndAllocatedBitsUnallocated", "extended_l2=on", m1, {"write 256k 1k"}, 0,
                 {be64(kL2 + 24, (1ull << 32) | 1)}, Op::kIo, {cmd + " 0 192k"}, true, true, {{kL2 + 16, 16}}});
    // The bitmap of a compressed cluster is unused: ignored.
    c.push_back({C + "CompressedClusterWithBitmap", "extended_l2=on", m1, {"write -P 11 -c 0 64k"}, 0,
                 {{kL2 + 11, {0x01, 0x80}}}, Op::kIo, {cmd + " -P 11 0 64k"}, false, false, {}});
  }
  return c;
}

struct Root {
  std::string name;
  std::string dir;  // "" = $TEST_TMPDIR
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }
void PrintTo(const Root& r, std::ostream* os) { *os << r.name; }

class Corruption : public ::testing::TestWithParam<std::tuple<Case, Root>> {};

bool marked_corrupt(const std::string& path) {
  return (peek_be64(path, header_field::kIncompatibleFeatures).value_or(0) & kIncompatCorruptBit) != 0;
}

std::vector<std::string> tool_argv(bool qemu, const Case& c, const std::string& image) {
  std::vector<std::string> argv;
  switch (c.op) {
    case Op::kIo:
    case Op::kIoReadOnly:
      argv = qemu ? std::vector<std::string>{"qemu-io", "-f", "qcow2"}
                  : std::vector<std::string>{uqcow_binary(), "io", "-f", "qcow2"};
      if (c.op == Op::kIoReadOnly) argv.push_back("-r");
      for (const auto& cmd : c.commands) {
        argv.push_back("-c");
        argv.push_back(cmd);
      }
      break;
    case Op::kSnapshotCreate:
      argv = qemu ? std::vector<std::string>{"qemu-img", "snapshot", "-c", "snap"}
                  : std::vector<std::string>{uqcow_binary(), "snapshot", "-c", "snap"};
      break;
    case Op::kShrinkTo32M:
      argv = qemu ? std::vector<std::string>{"qemu-img", "resize", "-f", "qcow2", "--shrink"}
                  : std::vector<std::string>{uqcow_binary(), "resize", "-f", "qcow2", "--shrink"};
      argv.push_back(image);
      argv.push_back("32M");
      return argv;
  }
  argv.push_back(image);
  return argv;
}

// Runs `check -r all` (twice at most: QEMU's own iotest 060 needs a second
// pass after some repairs) and reports whether qemu-img check then finds the
// image clean.
bool repaired_clean(bool qemu, const std::string& image) {
  for (int pass = 0; pass < 2; ++pass) {
    if (qemu) {
      (void)run_command({"qemu-img", "check", "-q", "-r", "all", image});
    } else {
      (void)run_uqcow({"check", "-q", "-r", "all", image});
    }
    if (run_command({"qemu-img", "check", "-q", image}).ok()) return true;
  }
  return false;
}

TEST_P(Corruption, SameDecisionAsQemu) {
  const auto& [c, root] = GetParam();
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  struct stat st{};
  if (!root.dir.empty() && stat(root.dir.c_str(), &st) != 0) GTEST_SKIP() << root.dir << " does not exist here";
  TempDir dir("uqcow-corruption", root.dir);

  const std::string damaged = dir.file("damaged.qcow2");
  ImageBuilder b(dir.path());
  b.create("damaged.qcow2", "qcow2", c.create_options, c.size);
  if (!c.setup.empty()) b.write("damaged.qcow2", "qcow2", {}, c.setup);
  if (c.truncate_to) b.run({"truncate", "-s", std::to_string(c.truncate_to), "damaged.qcow2"});
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  for (const auto& p : c.pokes) ASSERT_TRUE(patch_file(damaged, p.offset, p.bytes));
  ASSERT_FALSE(marked_corrupt(damaged));
  const auto before = read_file(damaged);
  ASSERT_TRUE(before);

  const std::string q = dir.file("qemu.qcow2"), u = dir.file("uqcow.qcow2");
  ASSERT_TRUE(write_file(q, *before));
  ASSERT_TRUE(write_file(u, *before));

  auto qr = run_command(tool_argv(true, c, q));
  auto ur = run_command(tool_argv(false, c, u));
  EXPECT_EQ(!qr.ok(), c.fails) << "QEMU's decision changed:\n" << qr.describe();
  EXPECT_EQ(marked_corrupt(q), c.marked) << "QEMU's decision changed:\n" << qr.describe();
  EXPECT_EQ(!ur.ok(), c.fails) << ur.describe();
  EXPECT_EQ(marked_corrupt(u), c.marked) << ur.describe();

  const auto after = read_file(u);
  ASSERT_TRUE(after);
  if (c.whole_file_untouched) {
    EXPECT_TRUE(SameBytes(*after, *before)) << "uqcow changed the image:\n" << ur.describe();
  }
  for (const Range& r : c.untouched) {
    ASSERT_LE(r.offset + r.length, before->size());
    ASSERT_LE(r.offset + r.length, after->size());
    EXPECT_TRUE(SameBytes(std::span(*after).subspan(r.offset, r.length),
                          std::span(*before).subspan(r.offset, r.length), r.offset))
        << "uqcow wrote through the damaged structure:\n" << ur.describe();
  }

  // The way back: wherever qemu-img check -r all repairs QEMU's copy, uqcow
  // check -r all repairs uqcow's. (Where QEMU cannot, e.g. an unaligned
  // refcount block in an image already marked corrupt, uqcow may do better.)
  const bool qemu_repairs = repaired_clean(true, q);
  const bool uqcow_repairs = repaired_clean(false, u);
  if (qemu_repairs) {
    EXPECT_TRUE(uqcow_repairs) << "qemu-img check -r all repairs QEMU's copy; uqcow's is not clean";
  }
  if (uqcow_repairs) {
    EXPECT_FALSE(marked_corrupt(u)) << "check -r all leaves the corrupt bit set";
  }
}

// A clean shrink gives back what qemu-img's gives back: L2 tables past the
// new end, refcount blocks that count nothing, the file's tail.
TEST(Shrink, GivesBackWhatQemuGivesBack) {
  UQ_REQUIRE_TOOL("qemu-img");
  UQ_REQUIRE_TOOL("qemu-io");
  TempDir dir("uqcow-shrink");
  ImageBuilder b(dir.path());
  // 512-byte clusters: many refcount blocks and L2 tables, far apart. Data
  // past the new end is cropped, zero clusters too.
  b.create("img.qcow2", "qcow2", "cluster_size=512", 64ull << 20);
  b.write("img.qcow2", "qcow2",
          {P(0, 1 << 20, 0x11), P(40ull << 20, 2 << 20, 0x22), D(40ull << 20, 1 << 20), P(50ull << 20, 8192, 0x33)});
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  const auto image = read_file(dir.file("img.qcow2"));
  ASSERT_TRUE(image);
  ASSERT_TRUE(write_file(dir.file("q.qcow2"), *image));
  ASSERT_TRUE(write_file(dir.file("u.qcow2"), *image));
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "resize", "-q", "--shrink", dir.file("q.qcow2"), "32M"})));
  ASSERT_TRUE(Succeeded(run_uqcow({"resize", "--shrink", dir.file("u.qcow2"), "32M"})));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", dir.file("u.qcow2")})));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "compare", dir.file("q.qcow2"), dir.file("u.qcow2")})));
  const auto q = read_file(dir.file("q.qcow2")), u = read_file(dir.file("u.qcow2"));
  ASSERT_TRUE(q && u);
  EXPECT_LT(u->size(), image->size()) << "the file's tail was not truncated";
  EXPECT_EQ(u->size(), q->size());
  // The L1 entries past the new end are zero on disk, as in QEMU's copy.
  const uint64_t l1 = peek_be64(dir.file("u.qcow2"), 40).value_or(0);
  const uint32_t l1_size = peek_be32(dir.file("u.qcow2"), 36).value_or(0);
  for (uint32_t i = 0; i < l1_size; ++i) {
    EXPECT_EQ(peek_be64(dir.file("u.qcow2"), l1 + 8 * i), peek_be64(dir.file("q.qcow2"), l1 + 8 * i)) << "L1 entry " << i;
  }
}

std::string case_name(const ::testing::TestParamInfo<std::tuple<Case, Root>>& info) {
  return std::get<0>(info.param).name + "_" + std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(Iotests060And271, Corruption,
                         ::testing::Combine(::testing::ValuesIn(cases()),
                                            ::testing::Values(Root{"ext4", ""}, Root{"tmpfs", "/dev/shm"})),
                         case_name);

}  // namespace
}  // namespace uqcow::testing

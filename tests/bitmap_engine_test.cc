// Persistent dirty bitmaps through the engine (issue 15), with QEMU as the
// oracle: bitmaps made by qemu-img survive uqcow's writes and mark exactly
// what was written (qemu-nbd -B + nbdinfo --map read them back), a crash
// leaves them in use, damaged directories are refused with the field named
// (as qemu-io refuses them), and what uqcow adds or removes is what
// qemu-img info and qemu-img check then see.
#include <gtest/gtest.h>

#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "block/dirty_bitmap.h"
#include "qcow2/image.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

using Extents = std::vector<std::pair<uint64_t, uint64_t>>;  // dirty (offset, length), merged

class BitmapEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* t : {"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"}) {
      if (!require_tool(t)) GTEST_SKIP() << t << " is not installed";
    }
  }
  std::string img(const std::string& name) const { return dir_.file(name); }
  void sh(const std::vector<std::string>& argv) {
    auto r = run_command(argv);
    ASSERT_TRUE(r.ok()) << r.describe();
  }
  // The dirty extents of bitmap `name` as qemu-nbd exports them.
  Extents qemu_extents(const std::string& path, const std::string& name) {
    auto r = run_command({"nbdinfo", "--map=qemu:dirty-bitmap:" + name, "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
                          "-B", name, path, "]"});
    EXPECT_TRUE(r.ok()) << r.describe();
    Extents out;
    std::istringstream in(r.out);
    uint64_t off, len, flag;
    std::string word;
    while (in >> off >> len >> flag >> word) {
      if (flag & 1) out.emplace_back(off, len);
    }
    return out;
  }
  // The dirty extents of `bm`, merged the same way.
  static Extents extents_of(const DirtyBitmap& bm) {
    Extents out;
    uint64_t off = 0;
    while (off < bm.size()) {
      bool dirty = false;
      uint64_t n = bm.run_length(off, bm.size() - off, &dirty);
      if (dirty) out.emplace_back(off, n);
      off += n;
    }
    return out;
  }
  std::string info_json(const std::string& path) {
    auto r = run_command({"qemu-img", "info", "-U", "--output=json", path});
    EXPECT_TRUE(r.ok()) << r.describe();
    return r.out;
  }
  void expect_check_clean(const std::string& path) {
    auto r = run_command({"qemu-img", "check", path});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    EXPECT_NE(r.out.find("No errors were found"), std::string::npos) << r.describe();
  }
  static qcow2::Qcow2Image& qcow2_of(SyncDisk& d) { return dynamic_cast<qcow2::Qcow2Image&>(d.disk()); }
  static OpenOptions rw() {
    OpenOptions o;
    o.read_only = false;
    return o;
  }
  // An image with bitmaps made by qemu-img: b0 enabled (64 KiB granules),
  // b1 disabled (128 KiB); 1 MiB at 0 and 64 KiB at 5 MiB written by qemu-io.
  std::string qemu_image() {
    std::string p = img("q.qcow2");
    sh({"qemu-img", "create", "-q", "-f", "qcow2", p, "64M"});
    sh({"qemu-img", "bitmap", "--add", p, "b0"});
    sh({"qemu-img", "bitmap", "--add", "--disable", "-g", "128k", p, "b1"});
    sh({"qemu-io", "-c", "write 0 1M", "-c", "write 5M 64k", p});
    return p;
  }

  TempDir dir_{"bitmap_engine"};
};

TEST_F(BitmapEngineTest, QemuBitmapsTrackUqcowWritesAndSurviveClose) {
  const std::string p = qemu_image();
  {
    auto d = SyncDisk::open(p, rw());
    ASSERT_TRUE(d.ok()) << d.error().message();
    auto& q = qcow2_of(**d);
    auto b0 = q.dirty_bitmap("b0");
    ASSERT_TRUE(b0.ok()) << b0.error().message();
    EXPECT_EQ(extents_of(**b0), (Extents{{0, 1 << 20}, {5 << 20, 65536}}));
    // In use on disk while open read-write.
    EXPECT_NE(info_json(p).find("\"in-use\""), std::string::npos);
    std::vector<uint8_t> data(4096, 0x5a);
    ASSERT_TRUE((*d)->run(q.write(8 << 20, std::span<const std::byte>(reinterpret_cast<const std::byte*>(data.data()), data.size()))).ok());
    ASSERT_TRUE((*d)->run(q.write_zeroes(16 << 20, 65536, true)).ok());
    ASSERT_TRUE((*d)->run(q.discard(32 << 20, 3 * 65536)).ok());
    std::vector<std::byte> cluster(65536, std::byte{1});
    ASSERT_TRUE((*d)->run(q.write_compressed(40 << 20, cluster)).ok());
    const Extents want{{0, 1 << 20},         {5 << 20, 65536},  {8 << 20, 65536},
                       {16 << 20, 65536},    {32 << 20, 3 * 65536}, {40 << 20, 65536}};
    EXPECT_EQ(extents_of(**b0), want);
    auto b1 = q.dirty_bitmap("b1");
    ASSERT_TRUE(b1.ok());
    EXPECT_EQ((*b1)->dirty_granules(), 0u) << "a disabled bitmap must not track";
    ASSERT_TRUE((*d)->close().ok());
    expect_check_clean(p);
    EXPECT_EQ(qemu_extents(p, "b0"), want);
    EXPECT_TRUE(qemu_extents(p, "b1").empty());
  }
  const std::string info = info_json(p);
  EXPECT_EQ(info.find("\"in-use\""), std::string::npos) << info;
  EXPECT_NE(info.find("\"name\": \"b1\""), std::string::npos) << info;
  // And qemu-io carries on from what uqcow stored.
  sh({"qemu-io", "-c", "write 60M 64k", p});
  auto ext = qemu_extents(p, "b0");
  ASSERT_FALSE(ext.empty());
  EXPECT_EQ(ext.back(), (std::pair<uint64_t, uint64_t>{60 << 20, 65536}));
}

TEST_F(BitmapEngineTest, ACrashLeavesTheBitmapInUseAndCheckRepairAllRemovesIt) {
  const std::string p = qemu_image();
  const std::string crashed = img("crashed.qcow2");
  {
    auto d = SyncDisk::open(p, rw());
    ASSERT_TRUE(d.ok()) << d.error().message();
    std::vector<uint8_t> data(65536, 7);
    ASSERT_TRUE((*d)->run(qcow2_of(**d).write(
                              20 << 20, std::span<const std::byte>(reinterpret_cast<const std::byte*>(data.data()), data.size())))
                    .ok());
    ASSERT_TRUE((*d)->run(qcow2_of(**d).flush()).ok());
    // The file as a crash would leave it: copied while open.
    sh({"cp", p, crashed});
    ASSERT_TRUE((*d)->close().ok());
  }
  EXPECT_NE(info_json(crashed).find("\"in-use\""), std::string::npos);
  {
    auto d = SyncDisk::open(crashed, rw());
    ASSERT_TRUE(d.ok()) << d.error().message();
    auto b0 = qcow2_of(**d).dirty_bitmap("b0");
    ASSERT_FALSE(b0.ok());
    EXPECT_EQ(b0.error().code(), EINVAL);
    EXPECT_NE(b0.error().message().find("inconsistent"), std::string::npos);
    EXPECT_EQ((*d)->run(qcow2_of(**d).resize(128 << 20)).error().code(), ENOTSUP);
    ASSERT_TRUE((*d)->close().ok());
  }
  EXPECT_NE(info_json(crashed).find("\"in-use\""), std::string::npos) << "still inconsistent after a clean close";
  expect_check_clean(crashed);
  auto r = run_uqcow({"check", "-r", "all", crashed});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  expect_check_clean(crashed);
  // Every bitmap loaded read-write was in use at the crash, the disabled b1
  // too (as QEMU marks them): both go.
  const std::string info = info_json(crashed);
  EXPECT_EQ(info.find("bitmaps"), std::string::npos) << info;
}

// bitmap-store-interval=0: a flush stores the bitmaps with IN_USE cleared,
// and the next write sets it again before its data can reach the disk. The
// file copied at each point is what a crash there would leave.
TEST_F(BitmapEngineTest, AFlushStoresTheBitmapAndTheNextWriteSetsInUseFirst) {
  const std::string p = qemu_image();
  OpenOptions o = rw();
  o.bitmap_store_interval = 0;
  auto d = SyncDisk::open(p, o);
  ASSERT_TRUE(d.ok()) << d.error().message();
  auto& q = qcow2_of(**d);
  std::vector<uint8_t> data(4096, 9);
  auto bytes = std::span<const std::byte>(reinterpret_cast<const std::byte*>(data.data()), data.size());
  ASSERT_TRUE((*d)->run(q.write(20 << 20, bytes)).ok());
  ASSERT_TRUE((*d)->run(q.flush()).ok());
  sh({"cp", p, img("after_flush.qcow2")});
  ASSERT_TRUE((*d)->run(q.write(30 << 20, bytes)).ok());
  sh({"cp", p, img("after_write.qcow2")});
  ASSERT_TRUE((*d)->run(q.discard(0, 1 << 20)).ok());
  ASSERT_TRUE((*d)->run(q.flush()).ok());
  sh({"cp", p, img("after_discard_flush.qcow2")});
  ASSERT_TRUE((*d)->close().ok());
  // Stored clean at the flush: consistent, with the write.
  EXPECT_EQ(info_json(img("after_flush.qcow2")).find("\"in-use\""), std::string::npos);
  EXPECT_EQ(qemu_extents(img("after_flush.qcow2"), "b0"),
            (Extents{{0, 1 << 20}, {5 << 20, 65536}, {20 << 20, 65536}}));
  expect_check_clean(img("after_flush.qcow2"));
  // A write after it: in use on disk before its data was written.
  EXPECT_NE(info_json(img("after_write.qcow2")).find("\"in-use\""), std::string::npos);
  EXPECT_EQ(qemu_extents(img("after_discard_flush.qcow2"), "b0"),
            (Extents{{0, 1 << 20}, {5 << 20, 65536}, {20 << 20, 65536}, {30 << 20, 65536}}));
  expect_check_clean(p);
}

TEST_F(BitmapEngineTest, AddedAndRemovedBitmapsAreWhatQemuSees) {
  const std::string p = qemu_image();
  {
    auto d = SyncDisk::open(p, rw());
    ASSERT_TRUE(d.ok()) << d.error().message();
    auto& q = qcow2_of(**d);
    ASSERT_TRUE(q.bitmap_add("fine", 4096, true).ok());
    EXPECT_EQ(q.bitmap_add("fine", 4096, true).error().code(), EEXIST);
    EXPECT_EQ(q.bitmap_add("odd", 3000, true).error().code(), EINVAL);
    EXPECT_EQ(q.bitmap_add("tiny", 256, true).error().code(), EINVAL);
    ASSERT_TRUE(q.bitmap_remove("b0").ok());
    EXPECT_EQ(q.bitmap_remove("b0").error().code(), ENOENT);
    ASSERT_TRUE(q.bitmap_set_enabled("b1", true).ok());
    std::vector<uint8_t> data(100, 3);
    ASSERT_TRUE((*d)->run(q.write(12345, std::span<const std::byte>(reinterpret_cast<const std::byte*>(data.data()), data.size()))).ok());
    ASSERT_TRUE((*d)->close().ok());
  }
  expect_check_clean(p);  // b0's clusters were freed, the new ones counted
  const std::string info = info_json(p);
  EXPECT_EQ(info.find("\"name\": \"b0\""), std::string::npos) << info;
  EXPECT_NE(info.find("\"granularity\": 4096"), std::string::npos) << info;
  EXPECT_EQ(qemu_extents(p, "fine"), (Extents{{12288, 4096}}));
  EXPECT_EQ(qemu_extents(p, "b1"), (Extents{{0, 131072}}));
}

TEST_F(BitmapEngineTest, ResizeCarriesTheBitmapsAlong) {
  const std::string p = qemu_image();
  {
    auto d = SyncDisk::open(p, rw());
    ASSERT_TRUE(d.ok()) << d.error().message();
    auto& q = qcow2_of(**d);
    ASSERT_TRUE((*d)->run(q.resize(200 << 20)).ok());
    std::vector<uint8_t> data(512, 1);
    ASSERT_TRUE((*d)->run(q.write(150 << 20, std::span<const std::byte>(reinterpret_cast<const std::byte*>(data.data()), data.size()))).ok());
    ASSERT_TRUE((*d)->close().ok());
  }
  expect_check_clean(p);
  EXPECT_EQ(qemu_extents(p, "b0"), (Extents{{0, 1 << 20}, {5 << 20, 65536}, {150 << 20, 65536}}));
  auto r = run_uqcow({"resize", "--shrink", p, "4M"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  expect_check_clean(p);
  EXPECT_EQ(qemu_extents(p, "b0"), (Extents{{0, 1 << 20}}));
}

TEST_F(BitmapEngineTest, SnapshotApplyIsRefusedWhileBitmapsExist) {
  const std::string p = qemu_image();
  sh({"qemu-img", "snapshot", "-c", "s1", p});
  auto q = run_command({"qemu-img", "snapshot", "-a", "s1", p});
  auto u = run_uqcow({"snapshot", "-a", "s1", p});
  EXPECT_NE(q.exit_code, 0);
  EXPECT_EQ(u.exit_code, q.exit_code) << u.describe();
  EXPECT_NE(u.err.find("active dirty bitmaps"), std::string::npos) << u.describe();
}

TEST_F(BitmapEngineTest, ADirectoryWrittenByAProgramWithoutBitmapSupportIsDropped) {
  const std::string p = qemu_image();
  auto autoclear = peek_be64(p, 88);
  ASSERT_TRUE(autoclear.has_value());
  ASSERT_TRUE(patch_be64(p, 88, *autoclear & ~uint64_t{1}));
  {
    auto d = SyncDisk::open(p, rw());
    ASSERT_TRUE(d.ok()) << d.error().message();
    EXPECT_EQ(qcow2_of(**d).dirty_bitmap("b0").error().code(), ENOENT);
    ASSERT_TRUE((*d)->close().ok());
  }
  const std::string info = info_json(p);
  EXPECT_EQ(info.find("bitmaps"), std::string::npos) << info;
  // As with QEMU: the bitmaps' clusters are leaked, not reused.
  auto r = run_command({"qemu-img", "check", p});
  EXPECT_EQ(r.exit_code, 3) << r.describe();
}

TEST_F(BitmapEngineTest, Version2ImagesCannotStoreBitmaps) {
  const std::string p = img("v2.qcow2");
  sh({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "16M"});
  auto d = SyncDisk::open(p, rw());
  ASSERT_TRUE(d.ok()) << d.error().message();
  auto s = qcow2_of(**d).bitmap_add("b", 65536, true);
  EXPECT_EQ(s.error().code(), EINVAL);
  EXPECT_NE(s.error().message().find("v2"), std::string::npos) << s.error().message();
}

// Damaged directories: uqcow refuses to open, naming the field, where
// qemu-io refuses too. Offsets are into the directory entry of b0.
struct Damage {
  const char* what;
  uint64_t offset;  // into the first directory entry
  int width;        // 1, 2, 4 or 8 bytes
  uint64_t value;
  const char* field;
};

class BitmapDamageTest : public BitmapEngineTest, public ::testing::WithParamInterface<Damage> {};

TEST_P(BitmapDamageTest, RefusedLikeQemuWithTheFieldNamed) {
  const Damage& dmg = GetParam();
  const std::string p = qemu_image();
  // Find the directory through the header extension qemu-img wrote.
  auto r = run_command({"qemu-img", "info", "--output=json", p});
  ASSERT_TRUE(r.ok());
  auto hdr = read_file(p);
  ASSERT_TRUE(hdr.has_value());
  uint64_t dir = 0;
  for (size_t pos = 112; pos + 32 <= 65536;) {
    uint32_t type = (*hdr)[pos] << 24 | (*hdr)[pos + 1] << 16 | (*hdr)[pos + 2] << 8 | (*hdr)[pos + 3];
    uint32_t len = (*hdr)[pos + 4] << 24 | (*hdr)[pos + 5] << 16 | (*hdr)[pos + 6] << 8 | (*hdr)[pos + 7];
    if (type == 0) break;
    if (type == 0x23852875) {
      for (int i = 0; i < 8; ++i) dir = dir << 8 | (*hdr)[pos + 24 + i];
      break;
    }
    pos += 8 + ((len + 7) & ~7u);
  }
  ASSERT_NE(dir, 0u) << "no bitmaps extension found";
  const uint64_t at = dir + dmg.offset;
  bool ok = dmg.width == 1   ? patch_file(p, at, std::vector<uint8_t>{static_cast<uint8_t>(dmg.value)})
            : dmg.width == 2 ? patch_be16(p, at, static_cast<uint16_t>(dmg.value))
            : dmg.width == 4 ? patch_be32(p, at, static_cast<uint32_t>(dmg.value))
                             : patch_be64(p, at, dmg.value);
  ASSERT_TRUE(ok);
  auto q = run_command({"qemu-io", "-r", "-c", "read 0 512", p});
  EXPECT_NE(q.exit_code, 0) << "qemu-io accepts the damage: " << q.describe();
  for (bool read_only : {true, false}) {
    OpenOptions o;
    o.read_only = read_only;
    auto d = SyncDisk::open(p, o);
    ASSERT_FALSE(d.ok()) << dmg.what;
    EXPECT_EQ(d.error().code(), EINVAL) << d.error().message();
    EXPECT_NE(d.error().message().find(dmg.field), std::string::npos) << d.error().message();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BitmapDamageTest,
    ::testing::Values(Damage{"table offset unaligned", 0, 8, 0x10200, "bitmap_table_offset"},
                      Damage{"table offset zero", 0, 8, 0, "bitmap_table_offset"},
                      Damage{"table size zero", 8, 4, 0, "bitmap_table_size"},
                      Damage{"table size huge", 8, 4, 0x8000001, "bitmap_table_size"},
                      Damage{"reserved flag", 12, 4, 0x6, "flags"},
                      Damage{"type", 16, 1, 2, "type"},
                      Damage{"granularity too small", 17, 1, 8, "granularity_bits"},
                      Damage{"granularity too large", 17, 1, 32, "granularity_bits"},
                      Damage{"extra data", 20, 4, 8, "extra_data_size"},
                      Damage{"name past the directory", 18, 2, 1000, "name_size"}),
    [](const ::testing::TestParamInfo<Damage>& i) {
      std::string s = i.param.what;
      for (char& c : s) {
        if (!isalnum(static_cast<unsigned char>(c))) c = '_';
      }
      return s;
    });

}  // namespace
}  // namespace uqcow::testing

// DirtyBitmap against a model: one bool per granule, driven by seeded
// random operations; the serialised form against the qcow2 spec's bit order.
#include "block/dirty_bitmap.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace uqcow {
namespace {

struct Model {
  uint64_t size;
  uint64_t gran;
  std::vector<bool> bits;
  Model(uint64_t s, uint64_t g) : size(s), gran(g), bits((s + g - 1) / g) {}
  void set(uint64_t off, uint64_t len) {
    if (len == 0 || off >= size) return;
    uint64_t end = std::min(off + len, size);
    for (uint64_t g = off / gran; g <= (end - 1) / gran; ++g) bits[g] = true;
  }
  void reset(uint64_t off, uint64_t len) {
    if (len == 0 || off >= size) return;
    uint64_t end = std::min(off + len, size);
    for (uint64_t g = 0; g < bits.size(); ++g) {
      uint64_t b = g * gran, e = std::min(b + gran, size);
      if (b >= off && e <= end) bits[g] = false;
    }
  }
  bool at(uint64_t off) const { return bits[off / gran]; }
};

void expect_equal(const DirtyBitmap& bm, const Model& m) {
  uint64_t dirty = 0;
  for (uint64_t g = 0; g < m.bits.size(); ++g) {
    ASSERT_EQ(bm.dirty_at(g * m.gran), m.bits[g]) << "granule " << g;
    if (m.bits[g]) dirty += std::min(m.gran, m.size - g * m.gran);
  }
  EXPECT_EQ(bm.dirty_bytes(), dirty);
  // Runs cover the disk exactly and alternate with the model.
  uint64_t off = 0;
  while (off < m.size) {
    bool d = false;
    uint64_t n = bm.run_length(off, m.size - off, &d);
    ASSERT_GT(n, 0u);
    for (uint64_t o = off; o < off + n; o += m.gran) ASSERT_EQ(m.at(o), d) << "run at " << off;
    if (off + n < m.size) {
      ASSERT_NE(m.at(off + n), d) << "run at " << off << " stops early";
    }
    off += n;
  }
  EXPECT_EQ(off, m.size);
}

TEST(DirtyBitmap, RefusesBadGranularity) {
  EXPECT_EQ(DirtyBitmap::create(1 << 20, 256).error().code(), EINVAL);
  EXPECT_EQ(DirtyBitmap::create(1 << 20, 3 * 4096).error().code(), EINVAL);
  EXPECT_EQ(DirtyBitmap::create(1 << 20, uint64_t{1} << 32).error().code(), EINVAL);
  EXPECT_TRUE(DirtyBitmap::create(1 << 20, 512).ok());
}

TEST(DirtyBitmap, RandomOperationsMatchTheModel) {
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    std::mt19937_64 rng(seed);
    const uint64_t gran = uint64_t{512} << (rng() % 8);
    const uint64_t size = 512 * (1 + rng() % 4000);  // not a multiple of gran in general
    auto bm = DirtyBitmap::create(size, gran);
    ASSERT_TRUE(bm.ok());
    Model m(size, gran);
    for (int op = 0; op < 200; ++op) {
      uint64_t off = rng() % (size + 1024);
      uint64_t len = rng() % 3 == 0 ? rng() % 512 : rng() % (size / 2 + 1);
      if (rng() % 4 == 0) {
        bm->reset(off, len);
        m.reset(off, len);
      } else {
        bm->set(off, len);
        m.set(off, len);
      }
    }
    SCOPED_TRACE("seed " + std::to_string(seed));
    expect_equal(*bm, m);
  }
}

TEST(DirtyBitmap, SerialisedBitOrderIsTheSpecs) {
  // Granule 8k + j is bit j (least significant first) of byte k.
  auto bm = DirtyBitmap::create(64 << 20, 65536);
  ASSERT_TRUE(bm.ok());
  bm->set(0, 1 << 20);       // granules 0..15: bytes 0 and 1 all ones
  bm->set(5 << 20, 65536);   // granule 80: byte 10, bit 0
  bm->set(9 * 65536, 1);     // granule 9 (already set)
  bm->set(83 * 65536, 10);   // granule 83: byte 10, bit 3
  std::vector<uint8_t> out(bm->serialized_bytes());
  ASSERT_EQ(out.size(), 128u);
  bm->serialize(0, out);
  std::vector<uint8_t> want(128, 0);
  want[0] = 0xff;
  want[1] = 0xff;
  want[10] = 0x09;
  EXPECT_EQ(out, want);
  // Round trip through another bitmap, in pieces.
  auto copy = DirtyBitmap::create(64 << 20, 65536);
  copy->deserialize(0, std::span(out).first(7));
  copy->deserialize(7, std::span(out).subspan(7));
  EXPECT_TRUE(*copy == *bm);
  EXPECT_TRUE(bm->any_in_serialized_range(10, 1));
  EXPECT_FALSE(bm->any_in_serialized_range(2, 8));
}

TEST(DirtyBitmap, SerialisedRangesIgnoreBitsPastTheLastGranule) {
  auto bm = DirtyBitmap::create(10 * 4096 + 100, 4096);  // 11 granules
  ASSERT_TRUE(bm.ok());
  bm->set_serialized_range(0, 4);  // all ones: only 11 granules exist
  EXPECT_EQ(bm->dirty_granules(), 11u);
  EXPECT_EQ(bm->dirty_bytes(), 10 * 4096 + 100u);
  std::vector<uint8_t> out(4);
  bm->serialize(0, out);
  EXPECT_EQ(out, (std::vector<uint8_t>{0xff, 0x07, 0, 0}));
  bm->clear();
  const uint8_t ones[2] = {0xff, 0xff};
  bm->deserialize(0, ones);
  EXPECT_EQ(bm->dirty_granules(), 11u);
}

TEST(DirtyBitmap, MergeAcrossGranularities) {
  auto fine = DirtyBitmap::create(1 << 20, 4096);
  auto coarse = DirtyBitmap::create(1 << 20, 65536);
  fine->set(70000, 1);           // granule 17 of fine, granule 1 of coarse
  fine->set(300000, 8192);       // coarse granule 4
  coarse->merge_from(*fine);
  EXPECT_EQ(coarse->dirty_granules(), 2u);
  EXPECT_TRUE(coarse->dirty_at(65536));
  EXPECT_TRUE(coarse->dirty_at(4 * 65536));
  auto fine2 = DirtyBitmap::create(1 << 20, 4096);
  fine2->merge_from(*coarse);
  EXPECT_EQ(fine2->dirty_granules(), 32u);
  // Same granularity, shorter source.
  auto small = DirtyBitmap::create(65536, 4096);
  small->set(0, 4096);
  fine->merge_from(*small);
  EXPECT_TRUE(fine->dirty_at(0));
}

TEST(DirtyBitmap, ResizeDropsAndAddsCleanGranules) {
  auto bm = DirtyBitmap::create(1 << 20, 65536);
  bm->set_all();
  bm->resize((1 << 20) - 1000);
  EXPECT_EQ(bm->granules(), 16u);
  EXPECT_EQ(bm->dirty_bytes(), (1u << 20) - 1000);
  bm->resize(100 << 20);
  EXPECT_EQ(bm->dirty_granules(), 16u);
  EXPECT_FALSE(bm->dirty_at(16 * 65536));
  bm->resize(3 * 65536 + 1);
  EXPECT_EQ(bm->dirty_granules(), 4u);  // the cut granule 3 kept its bit
}

}  // namespace
}  // namespace uqcow

// Unit tests of the typed table accessors: where an entry and its bitmap sit
// in a slice, against the layout docs/interop/qcow2.txt gives, byte by byte.
#include "qcow2/tables.h"

#include <gtest/gtest.h>

#include <vector>

namespace uqcow::qcow2 {
namespace {

TEST(L2Slice, StandardEntriesAreEightBytesBigEndian) {
  const Geometry g = Geometry::make(16, /*extended_l2=*/false);
  std::vector<uint8_t> raw(64, 0);
  L2Slice s(raw.data(), g);
  EXPECT_EQ(s.entry_size(), 8u);
  s.set_entry(2, 0x8000000000050000ull);
  EXPECT_EQ(raw[16], 0x80);  // entry 2 starts at byte 16, most significant first
  EXPECT_EQ(raw[21], 0x05);
  EXPECT_EQ(raw[23], 0x00);
  EXPECT_EQ(s.entry(2), 0x8000000000050000ull);
  EXPECT_EQ(s.entry(1), 0u);
  EXPECT_EQ(s.entry(3), 0u);
  // No bitmap without extended L2: reads 0, and setting one changes nothing.
  s.set_bitmap(2, 0xffffffffull);
  EXPECT_EQ(s.bitmap(2), 0u);
  EXPECT_EQ(s.entry(3), 0u);
  EXPECT_EQ(ConstL2Slice(raw.data(), g).entry(2), 0x8000000000050000ull);
}

TEST(L2Slice, ExtendedEntriesCarryTheirBitmapInTheNextEightBytes) {
  const Geometry g = Geometry::make(16, /*extended_l2=*/true);
  std::vector<uint8_t> raw(4 * 16, 0);
  L2Slice s(raw.data(), g);
  EXPECT_EQ(s.entry_size(), 16u);
  s.set(1, 0x60000ull, 0x00000003fffffffcull);
  EXPECT_EQ(raw[16 + 5], 0x06);          // entry 1 at byte 16
  EXPECT_EQ(raw[24 + 3], 0x03);          // its bitmap at byte 24: zero bits high
  EXPECT_EQ(raw[24 + 7], 0xfc);          // allocated bits low
  EXPECT_EQ(s.entry(1), 0x60000ull);
  EXPECT_EQ(s.bitmap(1), 0x00000003fffffffcull);
  EXPECT_EQ(s.entry(0), 0u);
  EXPECT_EQ(s.bitmap(2), 0u);
}

TEST(Tables, EncodeDecodeRoundTripAndPadding) {
  const std::vector<uint64_t> t = {0x10000, 0, 0x8000000000030000ull};
  std::vector<uint8_t> raw = encode_table(t, 64);
  ASSERT_EQ(raw.size(), 64u);
  EXPECT_EQ(raw[5], 0x01);
  EXPECT_EQ(raw[16], 0x80);
  for (size_t i = 24; i < raw.size(); ++i) EXPECT_EQ(raw[i], 0) << "padding at " << i;
  std::vector<uint64_t> back = decode_table(raw);
  ASSERT_EQ(back.size(), 8u);
  EXPECT_EQ(back[0], t[0]);
  EXPECT_EQ(back[2], t[2]);
  EXPECT_EQ(back[7], 0u);
  EXPECT_EQ(encode_table(t).size(), 24u) << "no padding asked: 8 bytes an entry";
}

}  // namespace
}  // namespace uqcow::qcow2

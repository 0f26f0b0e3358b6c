// The oracle's rules on small hand-made histories, and the data pattern.
#include "tests/sim/oracle.h"

#include <gtest/gtest.h>

#include <memory>
#include <vector>

namespace uqcow::sim {
namespace {

Effect write(uint64_t op, uint64_t begin, uint64_t end, uint64_t issue, uint64_t complete) {
  Effect e;
  e.kind = Effect::Kind::kData;
  e.begin = begin;
  e.end = end;
  e.issue = issue;
  e.complete = complete;
  e.op = op;
  return e;
}

Effect with_kind(Effect e, Effect::Kind kind) {
  e.kind = kind;
  return e;
}

std::vector<uint8_t> data(uint64_t op, uint64_t begin, uint64_t end) {
  std::vector<uint8_t> v(end - begin);
  data_bytes(op, begin, false, v);
  return v;
}

TEST(Oracle, DataBytesMatchDataByteAndDifferPerOpAndOffset) {
  for (bool runs : {false, true}) {
    for (uint64_t start : {0, 1, 7, 8, 31, 33, 4095}) {
      std::vector<uint8_t> v(100);
      data_bytes(5, start, runs, v);
      for (size_t i = 0; i < v.size(); ++i) {
        ASSERT_EQ(v[i], data_byte(5, start + i, runs)) << start << "+" << i;
        ASSERT_NE(v[i], 0);
      }
    }
  }
  EXPECT_NE(data(1, 0, 64), data(2, 0, 64));
  EXPECT_NE(data(1, 0, 64), data(1, 8, 72));  // another offset's data
  EXPECT_NE(data(1, 0, 64), data(1, 1, 65));
}

TEST(Oracle, ReadSeesOverlappingOrLatestCompletedWrite) {
  History h(std::make_shared<std::vector<uint8_t>>(16, 0x11));
  h.add(write(1, 0, 16, 1, 2));  // completed before the read
  h.add(write(2, 0, 8, 5, 9));   // overlaps the read [4, 6]
  // Bytes 0-7: op 1 or op 2; 8-15: op 1 only (start superseded by op 1).
  std::vector<uint8_t> got = data(1, 0, 16);
  EXPECT_EQ(h.check(0, got, 4, 6), "");
  std::vector<uint8_t> two = data(2, 0, 8);
  std::copy(two.begin(), two.end(), got.begin());
  EXPECT_EQ(h.check(0, got, 4, 6), "");
  got[12] = 0x11;  // the batch start after op 1 completed
  EXPECT_NE(h.check(0, got, 4, 6), "");
}

TEST(Oracle, AStrongWriteSupersedesButATrimDoesNot) {
  History h(std::make_shared<std::vector<uint8_t>>(8, 0x11));
  h.add(write(1, 0, 8, 1, 2));
  h.add(with_kind(write(2, 0, 8, 3, 4), Effect::Kind::kTrim));  // after op 1
  h.add(with_kind(write(3, 4, 8, 5, 6), Effect::Kind::kZero));  // after both
  std::vector<uint8_t> got = data(1, 0, 8);
  // Bytes 0-3: op 1's data or zero (trimmed); 4-7: only zero.
  EXPECT_NE(h.check(0, got, 10, 11), "");
  std::fill(got.begin() + 4, got.end(), 0);
  EXPECT_EQ(h.check(0, got, 10, 11), "");
  got[0] = 0;
  EXPECT_EQ(h.check(0, got, 10, 11), "");
  got[1] = 0x11;  // superseded by op 1
  EXPECT_NE(h.check(0, got, 10, 11), "");
}

TEST(Oracle, WhatAShrinkDropsIsDataZeroOrTheBackingFile) {
  // A crash image that kept the old size: bytes past the new end may hold
  // their data, zero, or the backing file's byte (weak effects: kTrim and
  // kBacking over the dropped range), and nothing else.
  History h(std::make_shared<std::vector<uint8_t>>(8, 0x11));
  h.add(write(1, 0, 8, 1, 2));
  Effect dropped = with_kind(write(2, 4, 8, 3, kNever), Effect::Kind::kTrim);
  h.add(dropped);
  dropped.kind = Effect::Kind::kBacking;
  dropped.content = std::make_shared<std::vector<uint8_t>>(8, 0x22);
  h.add(dropped);
  std::vector<uint8_t> got = data(1, 0, 8);
  EXPECT_EQ(h.check(0, got, 3, kNever), "");
  got[4] = 0;
  got[5] = 0x22;
  EXPECT_EQ(h.check(0, got, 3, kNever), "");
  got[6] = 0x11;  // the batch start, superseded by op 1
  EXPECT_NE(h.check(0, got, 3, kNever), "");
  got[6] = 0x22;
  got[1] = 0x22;  // below the new end: only op 1's data
  EXPECT_NE(h.check(0, got, 3, kNever), "");
}

TEST(Oracle, AnotherOffsetsDataIsNamed) {
  History h(std::make_shared<std::vector<uint8_t>>(8192, 0));
  h.add(write(7, 4096, 8192, 1, 2));
  std::vector<uint8_t> got(4096, 0);
  std::vector<uint8_t> other = data(7, 4096, 8192);
  std::copy(other.begin(), other.end(), got.begin());
  const std::string why = h.check(0, got, 3, 4);
  EXPECT_NE(why.find("op #7's data for guest offset 4096 (ANOTHER OFFSET)"), std::string::npos) << why;
}

TEST(Oracle, ReadModifyWriteMayRestoreWhatItRead) {
  // Op 2 (weak restore of bytes 0-7, running [2, 6]) may write back the
  // batch start or op 1's data (op 1 overlapped it), even after op 1
  // completed; but not op 3's, issued after it completed.
  History h(std::make_shared<std::vector<uint8_t>>(8, 0x11));
  h.add(write(1, 0, 8, 3, 4));
  h.add(with_kind(write(2, 0, 8, 2, 6), Effect::Kind::kRestore));
  std::vector<uint8_t> start(8, 0x11);
  EXPECT_EQ(h.check(0, start, 10, 11), "");
  EXPECT_EQ(h.check(0, data(1, 0, 8), 10, 11), "");
  h.add(write(3, 0, 8, 7, 8));
  EXPECT_NE(h.check(0, start, 10, 11), "");
  EXPECT_EQ(h.check(0, data(3, 0, 8), 10, 11), "");
}

TEST(Oracle, CrashObservationKeepsOpsInFlight) {
  History h(std::make_shared<std::vector<uint8_t>>(8, 0x11));
  h.add(write(1, 0, 8, 1, 2));      // completed before the last flush (issued at 3)
  h.add(write(2, 0, 8, 4, kNever));  // in flight at the crash
  EXPECT_EQ(h.check(0, data(1, 0, 8), 3, kNever), "");
  EXPECT_EQ(h.check(0, data(2, 0, 8), 3, kNever), "");
  EXPECT_NE(h.check(0, std::vector<uint8_t>(8, 0x11), 3, kNever), "") << "op 1 was flushed";
}

}  // namespace
}  // namespace uqcow::sim

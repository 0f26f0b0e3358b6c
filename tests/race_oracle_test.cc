// The race oracle on hand-made timelines: what it must accept (a correct
// server may return it) and what it must refuse, for each of its rules.
#include "tests/race_oracle.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace uqcow::testing {
namespace {

constexpr uint64_t kSize = 64;
constexpr uint8_t kStart = 0x77;

RaceOp op(RaceKind kind, uint64_t id, uint64_t offset, uint64_t length, uint64_t issued, uint64_t completed) {
  RaceOp o;
  o.kind = kind;
  o.id = id;
  o.offset = offset;
  o.length = length;
  o.issued = issued;
  o.completed = completed;
  return o;
}

RaceOp write(uint64_t id, uint64_t issued, uint64_t completed, uint64_t offset = 0, uint64_t length = kSize) {
  return op(RaceKind::kWrite, id, offset, length, issued, completed);
}

class RaceOracleTest : public ::testing::Test {
 protected:
  // A read of the whole range, issued at `issued` and completed at
  // `completed`, that got `got`.
  ::testing::AssertionResult read(const std::vector<uint8_t>& got, uint64_t issued, uint64_t completed) {
    return oracle_.check(batch_, 0, got, issued, completed);
  }
  static std::vector<uint8_t> start() { return std::vector<uint8_t>(kSize, kStart); }
  static std::vector<uint8_t> zeros() { return std::vector<uint8_t>(kSize, 0); }
  static std::vector<uint8_t> data(uint64_t id) { return race_data(id, 0, kSize); }

  RaceOracle oracle_{0, start()};
  std::vector<RaceOp> batch_;
};

TEST_F(RaceOracleTest, WrittenBytesAreNeverZeroAndNameTheirWriterAndOffset) {
  for (uint64_t id = 1; id < 100; ++id) {
    for (uint64_t g = 0; g < 4096; ++g) ASSERT_NE(race_byte(id, g), 0);
  }
  EXPECT_NE(race_data(1, 0, 64), race_data(2, 0, 64));
  EXPECT_NE(race_data(1, 0, 64), race_data(1, 65536, 64));
}

TEST_F(RaceOracleTest, NothingWrittenReadsTheStart) {
  EXPECT_TRUE(read(start(), 1, 2));
  EXPECT_FALSE(read(zeros(), 1, 2));
}

TEST_F(RaceOracleTest, AWriteCompletedBeforeTheReadIsTheOnlyValue) {
  batch_ = {write(1, 1, 2)};
  EXPECT_TRUE(read(data(1), 3, 4));
  EXPECT_FALSE(read(start(), 3, 4));
}

TEST_F(RaceOracleTest, AWriteOverlappingTheReadMayShowPerByte) {
  batch_ = {write(1, 2, 5)};
  std::vector<uint8_t> mixed = start();
  for (uint64_t g = 0; g < kSize; g += 2) mixed[g] = race_byte(1, g);
  EXPECT_TRUE(read(start(), 1, 3));
  EXPECT_TRUE(read(data(1), 1, 3));
  EXPECT_TRUE(read(mixed, 3, 6));
  EXPECT_FALSE(read(zeros(), 1, 3));
}

TEST_F(RaceOracleTest, AWriteIssuedAfterTheReadCompletedIsNotSeen) {
  batch_ = {write(1, 3, 4)};
  EXPECT_FALSE(read(data(1), 1, 2));
}

TEST_F(RaceOracleTest, ALaterStrongWriteSupersedes) {
  batch_ = {write(1, 1, 2), write(2, 3, 4)};
  EXPECT_TRUE(read(data(2), 5, 6));
  EXPECT_FALSE(read(data(1), 5, 6));
  EXPECT_FALSE(read(start(), 5, 6));
}

TEST_F(RaceOracleTest, WritesInFlightTogetherBothRemainPossible) {
  batch_ = {write(1, 1, 4), write(2, 2, 3)};  // 2 was sent before 1 completed
  EXPECT_TRUE(read(data(1), 5, 6));
  EXPECT_TRUE(read(data(2), 5, 6));
  EXPECT_FALSE(read(start(), 5, 6));
}

TEST_F(RaceOracleTest, ZeroWritesAreStrong) {
  for (RaceKind kind : {RaceKind::kWriteZeroes, RaceKind::kWriteZeroesNoHole}) {
    batch_ = {write(1, 1, 2), op(kind, 2, 0, kSize, 3, 4)};
    EXPECT_TRUE(read(zeros(), 5, 6));
    EXPECT_FALSE(read(data(1), 5, 6));
  }
}

TEST_F(RaceOracleTest, TrimAddsZeroAndSupersedesNothing) {
  batch_ = {write(1, 1, 2), op(RaceKind::kTrim, 2, 0, kSize, 3, 4)};
  EXPECT_TRUE(read(zeros(), 5, 6));
  EXPECT_TRUE(read(data(1), 5, 6));
  EXPECT_FALSE(read(start(), 5, 6));
  batch_ = {op(RaceKind::kTrim, 2, 0, kSize, 1, 2)};
  EXPECT_TRUE(read(start(), 3, 4));
  EXPECT_TRUE(read(zeros(), 3, 4));
}

TEST_F(RaceOracleTest, AFailedWriteSupersedesNothing) {
  batch_ = {write(1, 1, 2)};
  batch_[0].error = 5;
  EXPECT_TRUE(read(start(), 3, 4));
  EXPECT_TRUE(read(data(1), 3, 4));
}

TEST_F(RaceOracleTest, AnotherOffsetsDataIsRefusedAndNamed) {
  // Write 1 covers the first half; the second half reads its data, as if
  // both halves shared a host cluster.
  batch_ = {write(1, 1, 2, 0, kSize / 2)};
  std::vector<uint8_t> got = race_data(1, 0, kSize / 2);
  got.resize(kSize, 0);
  std::copy(got.begin(), got.begin() + kSize / 2, got.begin() + kSize / 2);
  auto result = read(got, 3, 4);
  ASSERT_FALSE(result);
  EXPECT_NE(std::string(result.message()).find("32 of 64 bytes wrong"), std::string::npos) << result.message();
  EXPECT_NE(std::string(result.message()).find("wrote at guest offset 0"), std::string::npos) << result.message();
}

TEST_F(RaceOracleTest, ReadsOutsideTheModelAreRefused) {
  std::vector<uint8_t> got(8, kStart);
  EXPECT_FALSE(oracle_.check(batch_, kSize - 4, got, 1, 2));
}

}  // namespace
}  // namespace uqcow::testing

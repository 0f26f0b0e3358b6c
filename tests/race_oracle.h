// The per-byte oracle for requests that overlap in time (issue 12): what a
// read may return while writes, zero writes and trims of the same bytes are
// in flight, on one logical clock shared by every connection.
//
// Each request has an issue time (when it was sent) and a completion time
// (when its reply arrived). For one byte, a read may return:
//  - the value of any write, zero write or trim that overlapped the read in
//    time (issued before the read completed, completed after it was issued);
//  - the value of one that completed before the read was issued and is not
//    superseded: no strong request to that byte was issued after it
//    completed and completed before the read was issued;
//  - the value the byte had before the batch, if no strong request to it
//    completed before the read was issued.
// WRITE and WRITE_ZEROES (with or without NO_HOLE) are strong; WRITE_ZEROES
// writes 0. TRIM is weak: it adds 0 as a possible value and supersedes
// nothing. A failed request is weak too (it may have been partly applied).
//
// Written data names its writer: race_byte(id, offset) differs between
// requests and between offsets and is never 0, so a byte that another
// request wrote at another guest offset, or zero where no zero could be, is
// told apart.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

namespace uqcow::testing {

// Byte `offset` (a guest offset) of what request `id` writes; never 0.
uint8_t race_byte(uint64_t id, uint64_t offset);
// race_byte() over [offset, offset + length).
std::vector<uint8_t> race_data(uint64_t id, uint64_t offset, size_t length);

enum class RaceKind { kRead, kWrite, kTrim, kWriteZeroes, kWriteZeroesNoHole, kFlush };

struct RaceOp {
  static constexpr uint64_t kPending = std::numeric_limits<uint64_t>::max();

  RaceKind kind = RaceKind::kRead;
  uint64_t id = 0;  // names the data a write writes
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t issued = 0;
  uint64_t completed = kPending;
  uint32_t error = 0;         // the reply's NBD error
  std::vector<uint8_t> data;  // what a read returned

  uint64_t end() const { return offset + length; }
  // Whether it may change the bytes it covers.
  bool changes_data() const {
    return kind == RaceKind::kWrite || kind == RaceKind::kTrim || kind == RaceKind::kWriteZeroes ||
           kind == RaceKind::kWriteZeroesNoHole;
  }
  // Whether, once completed, it decides what its bytes read.
  bool strong() const { return changes_data() && kind != RaceKind::kTrim && error == 0; }
  // The value it leaves at guest offset `g` (inside its range).
  uint8_t value_at(uint64_t g) const { return kind == RaceKind::kWrite ? race_byte(id, g) : 0; }
  // "#ID write 4096+512 [t3..t9]", for messages.
  std::string describe() const;
};

// Checks what a read returned against the ops of one batch. `start` holds
// the bytes of [base, base + start.size()) before the batch; every op of the
// batch lies inside that range and has its times set (kPending for one
// still in flight counts as completing after every read).
class RaceOracle {
 public:
  RaceOracle(uint64_t base, std::vector<uint8_t> start) : base_(base), start_(std::move(start)) {}

  uint64_t base() const { return base_; }
  const std::vector<uint8_t>& start() const { return start_; }
  // The next batch starts from these bytes (what was read after this one).
  void reset(std::vector<uint8_t> start) { start_ = std::move(start); }

  // Success, or how many bytes of the read are wrong and (with `explain`)
  // the first of them: what it could have been and whose data it is, if a
  // write of the batch put it at another offset (a slow search).
  ::testing::AssertionResult check(std::span<const RaceOp> batch, uint64_t offset, std::span<const uint8_t> got,
                                   uint64_t issued, uint64_t completed, bool explain = true) const;

 private:
  struct Segment;
  // Describes the wrong byte got[0] at guest offset `g` (got runs on to the
  // end of the read).
  std::string describe_byte(std::span<const RaceOp> batch, const Segment& seg, std::span<const uint8_t> got,
                      uint64_t g) const;

  uint64_t base_;
  std::vector<uint8_t> start_;
};

}  // namespace uqcow::testing
